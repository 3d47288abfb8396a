"""Bytes on storage: fsspec I/O, the input and export formats, and the files one stage passes the next."""
