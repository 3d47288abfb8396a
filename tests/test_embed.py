"""Encoder pooling and ordering, the packaged model against sentence-transformers, and the
Ray Data embed stage against the plain encoder."""

import contextlib
import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from posmine.config import Config, DataConfig, TeacherConfig
from posmine.io import storage
from posmine.io.vectors import read_embeddings
from posmine.models.backbone import ModelError, pool, resolve_model
from posmine.models.encoder import Encoder, cpu_half_precision_note, default_batch_tokens, token_batches
from posmine.pipeline import evaluation_view, student_view
from posmine.stages.data import run as prepare
from posmine.stages.embed import block_rows, embed_dataset, list_parts, run, stage_dir

TEXTS = ["cell protein", "the brain and the heart of a mouse study with a long text here",
         "drug", "vitamin diet sleep stress immune"]


def test_pooling_shapes_and_values() -> None:
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # (batch, seq, dim)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = pool(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(mean[1], hidden[1].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding: last real token at -1
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[:, -1])


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_batched_encoding_equals_one_by_one(tiny_model: str, pooling: str) -> None:
    enc = Encoder(TeacherConfig(model=tiny_model, pooling=pooling, batch_size=3))  # type: ignore[arg-type]
    together = enc.encode(TEXTS)  # sorted by length, padded, then put back in order
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert together.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)


def _token_batches_reference(lengths: list[int], batch_size: int, cap: int) -> list[list[int]]:
    """One text at a time, longest first: a batch closes when the next text would break a bound."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            b = batches[-1]
            longest = lengths[b[0]]
            if len(b) < batch_size and (cap <= 0 or (len(b) + 1) * longest <= cap):
                b.append(i)
                continue
        batches.append([i])
    return batches


@pytest.mark.parametrize("batch_size, cap", [(32, 0), (32, 2048), (4, 2048), (8, 100), (3, 7)])
def test_token_batches_equal_a_plain_loop(batch_size: int, cap: int) -> None:
    lengths = np.random.default_rng(cap + batch_size).integers(1, 300, size=257)
    got = [b.tolist() for b in token_batches(lengths, batch_size, cap)]
    assert got == _token_batches_reference(lengths.tolist(), batch_size, cap)
    assert sorted(i for b in got for i in b) == list(range(257))  # every text once


def test_token_cap_keeps_the_vectors(tiny_model: str) -> None:
    """The cap changes only how texts are grouped, not their vectors; its default is the CPU's
    (below), and a batch never holds more padded tokens than it allows."""
    texts = [" ".join(["word"] * n) for n in (3, 60, 7, 120, 1, 33, 90, 12)]
    free = Encoder(TeacherConfig(model=tiny_model, batch_size=8, batch_tokens=10**9))
    capped = Encoder(TeacherConfig(model=tiny_model, batch_size=8, batch_tokens=130))
    np.testing.assert_allclose(capped.encode(texts), free.encode(texts), atol=1e-5)
    here = default_batch_tokens("cpu", torch.float32, torch.backends.cpu.get_cpu_capability())
    assert Encoder(TeacherConfig(model=tiny_model)).batch_tokens == here
    assert Encoder(TeacherConfig(model=tiny_model, dtype="bfloat16")).batch_tokens == 0  # AMX: big tiles
    lengths = capped._token_lengths(texts, "")
    for b in token_batches(lengths, 8, capped.batch_tokens):
        assert len(b) == 1 or len(b) * lengths[b].max() <= 130


def test_the_default_token_cap_follows_the_cpu() -> None:
    """The cap helped only where it was measured to (AVX-512 Xeons, fp32 on the CPU)."""
    assert default_batch_tokens("cpu", torch.float32, "AVX512") == 2048
    assert default_batch_tokens("cpu", torch.float32, "AVX2") == 0
    assert default_batch_tokens("cpu", torch.float32, "DEFAULT") == 0
    assert default_batch_tokens("cpu", torch.bfloat16, "AVX512") == 0
    assert default_batch_tokens("cuda", torch.float32, "AVX512") == 0


def test_prefix_and_no_normalisation(tiny_model: str) -> None:
    enc = Encoder(TeacherConfig(model=tiny_model, normalize=False))
    plain, prefixed = enc.encode(["cell"]), enc.encode(["cell"], prefix="query: ")
    assert not np.allclose(plain, prefixed)
    assert abs(float(np.linalg.norm(plain)) - 1.0) > 1e-3


def test_packaged_model_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    path = resolve_model("default")
    ours = Encoder(TeacherConfig(max_length=256)).encode(TEXTS)
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = 256
    theirs = st.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_bf16_teacher_on_the_cpu_stays_near_fp32() -> None:
    """The opt-in bf16 teacher really runs in bf16 on the CPU (its vectors are not fp32's) and
    stays within cosine 0.999 of fp32 (0.9999 measured on SciFact), as float32 vectors."""
    fp32 = Encoder(TeacherConfig()).encode(TEXTS)
    enc = Encoder(TeacherConfig(dtype="bfloat16"))
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    bf16 = enc.encode(TEXTS)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    assert float((bf16 * fp32).sum(1).min()) > 0.999


def test_half_precision_on_the_cpu_is_flagged_where_it_is_slow() -> None:
    assert cpu_half_precision_note(torch.bfloat16, has_amx=True) is None
    assert "without AMX" in (cpu_half_precision_note(torch.bfloat16, has_amx=False) or "")
    assert "float16" in (cpu_half_precision_note(torch.float16, has_amx=True) or "")
    assert cpu_half_precision_note(torch.float32, has_amx=False) is None


def test_the_student_is_scored_at_the_device_precision_whatever_the_teacher() -> None:
    """A bf16 teacher changes the negatives, not the measurement: evaluation embeds at `auto`
    (fp32 on the CPU); re-mining with the student as teacher keeps the teacher's bf16."""
    cfg = Config(teacher=TeacherConfig(dtype="bfloat16"))
    assert student_view(cfg, "m").dtype == "bfloat16"
    scored = evaluation_view(cfg, "default")
    assert scored.dtype == "auto"
    assert next(Encoder(scored).model.parameters()).dtype == torch.float32


def test_bad_model_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model(str(tmp_path / "empty"))


def test_ray_data_stage_equals_plain_encoder(ray_local: None, tiny_beir: Path, tiny_model: str,
                                             tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    manifest = prepare(DataConfig(path=str(tiny_beir)), out)
    cfg = TeacherConfig(model=tiny_model, num_actors=1, cpus_per_actor=0.5, batch_size=4,
                        query_prefix="query: ", torch_threads=1, local_corpus_below=0)
    emb = run(cfg, f"{out}/data", out, manifest["config_hash"])
    assert emb["rows"] == {"corpus": 40, "queries": 12}
    target = storage.join(out, "embed")
    [folder] = storage.listdir(target)
    ids, mat = read_embeddings(f"{target}/{folder}/corpus")
    assert sorted(ids) == sorted(f"d{i}" for i in range(40)) and mat.shape == (40, 32)
    corpus = storage.read_parquet(f"{out}/data/corpus").to_pylist()
    text = {r["id"]: f"{r['title']} {r['text']}".strip() for r in corpus}
    plain = Encoder(cfg).encode([text[i] for i in ids])
    np.testing.assert_allclose(mat, plain, atol=1e-5)
    qids, qmat = read_embeddings(f"{target}/{folder}/queries")
    qtext = {r["id"]: r["text"] for r in storage.read_parquet(f"{out}/data/queries.parquet").to_pylist()}
    np.testing.assert_allclose(qmat, Encoder(cfg).encode([qtext[q] for q in qids], "query: "),
                               atol=1e-5)
    # rerun with the same config: skipped (manifest current)
    assert run(cfg, f"{out}/data", out, manifest["config_hash"])["finished_at"] == emb["finished_at"]
    other = run(replace(cfg, pooling="cls"), f"{out}/data", out, manifest["config_hash"])
    assert other["config_hash"] != emb["config_hash"]


def test_the_stage_keeps_input_order_whatever_the_global_context(ray_local: None, tiny_beir: Path,
                                                                  tmp_path: Path) -> None:
    """A part's vectors are written in the order of its rows, the same in every run (else the
    index's rows, and float ties in the search, change between runs). Ray Data copies the
    process's global context into a dataset as it is built: the stage's dataset keeps input order
    even where that context does not (a fresh process), and leaves the context as it was."""
    from ray.data import DataContext

    out = str(tmp_path / "out")
    prepare(DataConfig(path=str(tiny_beir)), out)
    listed = list_parts(f"{out}/data/corpus")
    options = DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, False  # a fresh process's default
    try:
        ds = embed_dataset(TeacherConfig(num_actors=2), listed, sorted(listed.rows), "corpus")
        assert ds.context.execution_options.preserve_order is True
        assert options.preserve_order is False
    finally:
        options.preserve_order = before


def test_ray_data_stage_streams_without_a_barrier(ray_local: None, tiny_beir: Path,
                                                  tmp_path: Path) -> None:
    """Blocks go to the encoder actors as they are read: no all-to-all operator, which would
    read and split the whole input (into the object store) before the first actor starts."""
    out = str(tmp_path / "out")
    prepare(DataConfig(path=str(tiny_beir)), out)
    listed = list_parts(f"{out}/data/corpus")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        embed_dataset(TeacherConfig(num_actors=2), listed, sorted(listed.rows), "corpus").explain()
    physical = printed.getvalue().split("Physical Plan (Optimized)")[1]
    assert "StreamingRepartition" in physical and "AllToAll" not in physical
    # blocks: at most BLOCK_ROWS rows, at least 4 per actor (SciFact's corpus: 8 of 648)
    assert block_rows(5183, 2) == 648 and block_rows(10**7, 8) == 4096 and block_rows(3, 2) == 1


def test_small_sides_embed_in_the_driver_by_part_and_resume(tiny_beir: Path, tiny_model: str,
                                                            tmp_path: Path) -> None:
    """Below `teacher.local_corpus_below` the corpus is embedded in this process, with the Ray
    stage's layout (one output per input part) and resume (a lost part alone is redone)."""
    out = str(tmp_path / "out")
    manifest = prepare(DataConfig(path=str(tiny_beir), rows_per_part=10), out)
    cfg = TeacherConfig(model=tiny_model, batch_size=4)
    assert cfg.local_corpus_below > 40
    emb = run(cfg, f"{out}/data", out, manifest["config_hash"])
    assert emb["rows"] == {"corpus": 40, "queries": 12}
    corpus_dir = Path(stage_dir(out, cfg), "corpus")
    parts = sorted(p.name for p in corpus_dir.iterdir())
    assert parts == sorted(p.name for p in Path(out, "data", "corpus").glob("part-*.parquet"))
    assert len(parts) == 4
    corpus = {r["id"]: f"{r['title']} {r['text']}".strip()
              for r in storage.read_parquet(f"{out}/data/corpus").to_pylist()}
    ids, mat = read_embeddings(str(corpus_dir))
    np.testing.assert_allclose(mat, Encoder(cfg).encode([corpus[i] for i in ids]), atol=1e-5)
    # a run that died after three parts: the rerun embeds the fourth only
    kept = {p: (corpus_dir / p).stat().st_mtime_ns for p in parts[:3]}
    (corpus_dir / parts[3]).unlink()
    Path(stage_dir(out, cfg), "_manifest.json").unlink()
    run(cfg, f"{out}/data", out, manifest["config_hash"])
    assert {p: (corpus_dir / p).stat().st_mtime_ns for p in parts[:3]} == kept
    ids2, mat2 = read_embeddings(str(corpus_dir))
    assert ids2 == ids
    np.testing.assert_allclose(mat2, mat, atol=1e-6)


def _retrained(model_dir: str, dst: Path) -> str:
    """The model with other weights (as training leaves it), saved to `dst`."""
    model = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(2.0)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dst)
    return str(dst)


def test_new_weights_under_the_same_path_are_embedded_again(ray_local: None, tiny_beir: Path,
                                                            tiny_model: str, tmp_path: Path) -> None:
    """`posmine run` always writes its fine-tuned model to `<out>/train/model`: a rerun with
    other training settings must evaluate the new weights, not the vectors of the old ones."""
    out = str(tmp_path / "out")
    manifest = prepare(DataConfig(path=str(tiny_beir)), out)
    student = tmp_path / "train" / "model"
    shutil.copytree(tiny_model, student)
    cfg = TeacherConfig(model=str(student), num_actors=1, cpus_per_actor=0.5, torch_threads=1)
    first = run(cfg, f"{out}/data", out, manifest["config_hash"])
    storage.put_tree(_retrained(tiny_model, tmp_path / "retrained"), str(student))  # as train does
    second = run(cfg, f"{out}/data", out, manifest["config_hash"])
    assert second["config_hash"] != first["config_hash"]
    ids, mat = read_embeddings(storage.join(stage_dir(out, cfg), "corpus"))
    corpus = {r["id"]: f"{r['title']} {r['text']}".strip()
              for r in storage.read_parquet(f"{out}/data/corpus").to_pylist()}
    np.testing.assert_allclose(mat, Encoder(cfg).encode([corpus[i] for i in ids]), atol=1e-5)
    # and unchanged weights are not embedded again
    assert run(cfg, f"{out}/data", out, manifest["config_hash"])["finished_at"] == second["finished_at"]


def test_model_on_object_storage_is_fetched_once_and_again_when_replaced(
        tiny_model: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder `posmine train` wrote to S3 (the loopback server) loads like a local one;
    the local copy is reused while the folder is unchanged and fetched again once replaced."""
    monkeypatch.setenv("POSMINE_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/models/tiny"
    storage.put_tree(tiny_model, url)
    cfg = TeacherConfig(model=url)
    want = Encoder(TeacherConfig(model=tiny_model)).encode(TEXTS)
    np.testing.assert_allclose(Encoder(cfg).encode(TEXTS), want, atol=1e-6)
    first = resolve_model(url)
    assert first.startswith(str(tmp_path / "cache" / "models")) and resolve_model(url) == first
    # a retrained model at the same URL: other weights, so another copy
    storage.put_tree(_retrained(tiny_model, tmp_path / "other"), url)
    second = resolve_model(url)
    assert second != first
    assert not np.allclose(Encoder(cfg).encode(TEXTS), want, atol=1e-4)
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model(f"{s3_bucket}/models/missing")


def test_the_embed_key_holds_the_resolved_device_and_precision() -> None:
    """`dtype: auto` is bf16 on a GPU and fp32 on the CPU: two sets of vectors, two keys; an
    explicit setting that resolves the same shares the key."""
    from posmine.stages.embed import output_key, resolved_precision

    cpu, gpu = TeacherConfig(device="cpu"), TeacherConfig(device="cuda")
    assert resolved_precision(cpu) == "cpu:float32" and resolved_precision(gpu) == "cuda:bfloat16"
    assert output_key(gpu) != output_key(cpu)
    assert output_key(gpu) == output_key(TeacherConfig(device="cuda", dtype="bfloat16"))
    assert output_key(cpu) == output_key(TeacherConfig(device="cpu", dtype="float32"))
    assert output_key(TeacherConfig(device="cuda", dtype="float32")) != output_key(cpu)


def _vectors(name: str, start: int, n: int) -> pa.Table:
    from posmine.io.vectors import embeddings_table

    rows = np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # (n, 4)
    table = embeddings_table([f"d{i}" for i in range(start, start + n)], rows)
    return table.append_column("path", pa.array([f"/in/{name}"] * n, pa.string()))


def test_a_part_in_progress_is_saved_in_pieces_by_rows_and_by_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces every `piece_rows` rows or `piece_seconds` seconds, each the part's rows since the
    last; the finished part is every row in order, and its pieces are gone; an earlier run's
    pieces count towards the part."""
    from posmine.stages import embed

    clock = [0.0]
    monkeypatch.setattr(embed.time, "monotonic", lambda: clock[0])
    dst = str(tmp_path / "corpus")
    cfg = TeacherConfig(piece_rows=10, piece_seconds=60.0)
    c = embed.PartCollector({"p.parquet": 30}, dst, "corpus", cfg, {})
    pieces = lambda: sorted(p.name for p in (tmp_path / "corpus" / "_pieces" / "p.parquet").glob("*"))  # noqa: E731
    c.add(_vectors("p.parquet", 0, 6))
    assert pieces() == []  # 6 rows, no time passed
    c.add(_vectors("p.parquet", 6, 6))
    assert pieces() == ["000000000000.parquet"]  # 12 rows >= 10: rows 0-11
    clock[0] = 61.0
    c.add(_vectors("p.parquet", 12, 3))
    assert pieces() == ["000000000000.parquet", "000000000012.parquet"]  # 3 rows, but a minute on
    saved = storage.read_parquet(f"{dst}/_pieces/p.parquet")
    assert saved.column("id").to_pylist() == [f"d{i}" for i in range(15)]
    # a new run keeps those 15 rows and embeds the other 15
    kept, pieces = embed.kept_pieces(dst, ["p.parquet"])
    assert pieces == 2
    again = embed.PartCollector({"p.parquet": 30}, dst, "corpus", cfg, kept)
    again.add(_vectors("p.parquet", 15, 15))
    again.check_complete(["p.parquet"])
    ids, mat = read_embeddings(f"{dst}/p.parquet")
    assert ids == [f"d{i}" for i in range(30)] and mat[:, 0].tolist() == list(range(30))
    assert not (tmp_path / "corpus" / "_pieces").exists()
