from pathlib import Path

import pytest

from posmine.config import RULES, Config, ConfigError, config_hash, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_defaults_are_the_papers() -> None:
    cfg = Config()
    assert cfg.mining.rule == "topk_percpos" and cfg.mining.perc == 0.95
    assert cfg.mining.margin == 0.05 and cfg.mining.threshold == 0.7 and cfg.mining.shift == 10
    assert cfg.mining.num_negatives == 4
    assert cfg.train.temperature == 0.05
    assert set(RULES) == {"naive_topk", "topk_shifted", "topk_abs", "topk_marginpos", "topk_percpos"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_job_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_documented_override_keys(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "data.path=s3://b/scifact", "data.split=dev", "teacher.model=/models/x",
        "mining.rule=topk_marginpos", "mining.perc=0.9", "mining.margin=0.1",
        "mining.threshold=0.8", "mining.num_negatives=7", "mining.top_k=50",
        "train.epochs=3", "output.dir=s3://b/out",
    ])
    assert cfg.data.path == "s3://b/scifact" and cfg.data.split == "dev"
    assert cfg.teacher.model == "/models/x" and cfg.mining.rule == "topk_marginpos"
    assert (cfg.mining.perc, cfg.mining.margin, cfg.mining.threshold) == (0.9, 0.1, 0.8)
    assert (cfg.mining.num_negatives, cfg.mining.top_k, cfg.train.epochs) == (7, 50, 3)
    assert cfg.output.dir == "s3://b/out"


def test_configs_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.mining.perc = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("override, needle", [
    ("mining.rul=topk_abs", "mining.rul"),
    ("minning.rule=x", "minning"),
    ("mining.rule=topk_best", "allowed values"),
    ("mining.num_negatives=four", "mining.num_negatives must be an integer"),
    ("mining.perc=3", "mining.perc must be in"),
    ("train.in_batch_negatives=maybe", "train.in_batch_negatives must be true or false"),
    ("teacher.pooling=max", "teacher.pooling"),
    ("index.cpus_per_shard=-1", "index.cpus_per_shard must be in"),
    ("nodot", "key.sub=value"),
])
def test_bad_keys_and_values_are_named(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_unknown_key_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("mining:\n  rule: naive_topk\n  negatives: 3\n")
    with pytest.raises(ConfigError, match=r"mining\.negatives.*allowed: rule"):
        load_config(p)


def test_hash_changes_with_config() -> None:
    a, b = Config(), load_config(None, ["mining.perc=0.9"])
    assert config_hash(a.mining) != config_hash(b.mining)
    assert config_hash(a.mining) == config_hash(Config().mining)


def test_stages_override_and_reject_bad_keys(tmp_path: Path) -> None:
    from posmine.config import resolve_stages

    p = tmp_path / "stages.yaml"
    p.write_text("train: {epochs: 2}\nstages:\n  - {}\n"
                 "  - {train: {in_batch_negatives: false}, mining: {rule: topk_marginpos},"
                 " remine_with_student: true}\n")
    [(m1, t1, r1), (m2, t2, r2)] = resolve_stages(load_config(p))
    assert (m1.rule, t1.in_batch_negatives, r1) == ("topk_percpos", True, False)
    assert (m2.rule, t2.in_batch_negatives, t2.epochs, r2) == ("topk_marginpos", False, 2, True)
    p.write_text("stages:\n  - {train: {in_batch: false}}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train\.in_batch"):
        load_config(p)


def test_extra_teachers_resolve_over_teacher_and_reject_bad_ones(tmp_path: Path) -> None:
    from posmine.config import resolve_teachers

    p = tmp_path / "teachers.yaml"
    p.write_text("teacher: {model: a, batch_size: 16}\nextra_teachers:\n  - {model: b}\n"
                 "  - {model: c, pooling: cls}\n")
    first, second, third = resolve_teachers(load_config(p))
    assert (first.model, second.model, second.batch_size, third.pooling) == ("a", "b", 16, "cls")
    for override, needle in [
        ("extra_teachers=[{modl: b}]", r"extra_teachers\[0\]\.modl"),
        ("extra_teachers=[{batch_size: 0}]", r"extra_teachers\[0\]: teacher\.batch_size"),
        ("extra_teachers=[{model: default}]", r"extra_teachers\[0\] repeats"),
        ("extra_teachers=[b]", r"extra_teachers\[0\] must be a mapping"),
        ("mining.combine=average", "allowed values"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="distill_weight > 0 with extra_teachers"):
        load_config(None, ["extra_teachers=[{model: b}]", "train.distill_weight=0.5"])


SECTIONS = {"data": "DataConfig", "teacher": "TeacherConfig", "index": "IndexConfig",
            "mining": "MiningConfig", "train": "TrainConfig", "evaluate": "EvaluateConfig",
            "tune": "TuneConfig", "train.lora": "LoraConfig"}


def _ranged_fields() -> list[tuple[str, str, object, object]]:
    """(section, field, its Range, its base type) for every numeric field of every section."""
    import dataclasses
    import typing

    from posmine import config

    out = []
    for section, name in SECTIONS.items():
        cls = getattr(config, name)
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            base = typing.get_type_hints(cls)[f.name]
            numeric = {int, float} & {base, *typing.get_args(base)} or any(
                a in (int, float) for a in typing.get_args(base) if a is not Ellipsis)
            if not numeric or base is bool:
                continue
            meta = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, config.Range)]
            out.append((section, f.name, meta[0] if meta else None, base))
    return out


def test_every_numeric_field_has_a_range() -> None:
    missing = [f"{s}.{n}" for s, n, r, _ in _ranged_fields() if r is None]
    assert not missing, missing


@pytest.mark.parametrize("section, name, bounds, base", _ranged_fields(),
                         ids=[f"{s}.{n}" for s, n, _, _ in _ranged_fields()])
def test_values_just_outside_each_range_are_refused_at_load(section: str, name: str, bounds,
                                                            base) -> None:
    """Every bound is enforced, and the error names the key; both bounds themselves load."""
    is_int = base is int or (int in getattr(base, "__args__", ()) and float not in base.__args__)
    step = 1 if is_int else max(abs(bounds.lo), abs(bounds.hi), 1.0) * 1e-6
    tuple_field = name == "k_values"
    # evaluate.top_k must cover the largest cut-off: hold the other one where it allows any value
    extra = {"evaluate.top_k": ["evaluate.k_values=[1]"],
             "evaluate.k_values": ["evaluate.top_k=100000"],
             "mining.range_min": ["mining.top_k=100000"]}.get(f"{section}.{name}", [])

    def value(v: float) -> str:
        v = int(v) if is_int else v
        return f"[{v}]" if tuple_field else repr(v)

    for v in (bounds.lo - step, bounds.hi + step):
        with pytest.raises(ConfigError, match=rf"{section}\.{name}(\[0\])? must be in"):
            load_config(None, [f"{section}.{name}={value(v)}", *extra])
    for v in (bounds.lo, bounds.hi):
        load_config(None, [f"{section}.{name}={value(v)}", *extra])


@pytest.mark.parametrize("override", [
    # the values reported as accepted at load (issue 16)
    "train.checkpoint_every=0", "train.log_every=0", "train.num_workers=0",
    "index.query_batch_size=0", "train.max_steps=-3", "train.warmup_ratio=7", "mining.perc=1.5",
    "mining.margin=-0.5", "evaluate.top_k=0", "train.grad_clip=-1", "train.lr=.nan",
])
def test_reported_bad_values_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_evaluate_depth_covers_the_cutoffs() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.top_k=20 is below"):
        load_config(None, ["evaluate.top_k=20"])  # k_values default to 1, 10, 100
    with pytest.raises(ConfigError, match=r"evaluate\.k_values is empty"):
        load_config(None, ["evaluate.k_values=[]"])


def test_lora_keys_checked_at_load() -> None:
    cfg = load_config(None, ["train.lora={r: 8, target_modules: [q_proj, v_proj]}",
                             "train.export_adapter=true"])
    assert cfg.train.lora is not None and cfg.train.lora.r == 8 and cfg.train.lora.alpha == 32
    assert cfg.train.lora.target_modules == ("q_proj", "v_proj")
    assert load_config(None, []).train.lora is None  # every weight trains by default
    with pytest.raises(ConfigError, match=r"train\.lora\.rank"):
        load_config(None, ["train.lora={rank: 8}"])
    with pytest.raises(ConfigError, match=r"train\.lora\.target_modules is empty"):
        load_config(None, ["train.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match=r"train\.export_adapter=true needs train\.lora"):
        load_config(None, ["train.export_adapter=true"])
    with pytest.raises(ConfigError, match=r"teacher\.attention='sideways' is not allowed"):
        load_config(None, ["teacher.attention=sideways"])
