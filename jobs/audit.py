"""Ray job entry point: posmine audit (see jobs/_entry.py)."""

from _entry import run

if __name__ == "__main__":
    run("audit")
