"""`posmine` command line: one verb per stage, each a thin call into the library."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import posmine.pipeline as pipeline
import posmine.report as report
import posmine.terminal as terminal
from posmine import __version__
from posmine.config import (
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    absolute_path,
    dump_yaml,
    load_config,
    starter_yaml,
)
from posmine.io import beir, export, lease, sources, storage
from posmine.io.export import FORMATS as EXPORT_FORMATS
from posmine.io.export import ExportError
from posmine.io.inputs import DataError
from posmine.io.storage import StorageError
from posmine.io.vectors import EmbeddingError
from posmine.models.backbone import ModelError
from posmine.stages import audit, tune
from posmine.stages.lifecycle import StageError

log = logging.getLogger(__name__)
# Errors whose message already says what went wrong and where: printed as they are.
_OURS = (ConfigError, DataError, StorageError, StageError, EmbeddingError, ModelError,
         ExportError, FileNotFoundError)



def _data(args: argparse.Namespace) -> int:
    fmt = sources.detect(args.path) if args.format == "auto" else args.format
    if fmt == "beir":
        summary = beir.load(args.path).summary()
    else:
        t = sources.load(DataConfig(path=absolute_path(args.path)), fmt)
        summary = {**t.summary, "qrels": {s: q.num_rows for s, q in t.qrels.items()},
                   "warnings": dict(t.warnings.counts)}
    print(json.dumps(storage.redact_all(summary), indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    summary = export.export(args.mine_dir, args.format, args.out, scores=args.scores,
                            num_negatives=args.num_negatives)
    print(json.dumps(storage.redact_all(summary), indent=2))
    return 0


@contextmanager
def _holding(cfg: Config) -> Iterator[None]:
    """The output folder's lease, then its log file, named once (a refused run writes none)."""
    with lease.hold(cfg.output.dir):
        log.info("log: %s", terminal.log_to_file(cfg.output.dir))
        yield


def _embed(cfg: Config, args: argparse.Namespace) -> None:
    print(terminal.summary("embed", pipeline.embed(cfg)))


def _mine(cfg: Config, args: argparse.Namespace) -> None:
    print(terminal.summary("mine", pipeline.mine(cfg)))


def _train(cfg: Config, args: argparse.Namespace) -> None:
    print(terminal.summary("train", pipeline.train(cfg)))


def _evaluate(cfg: Config, args: argparse.Namespace) -> None:
    print(terminal.summary("evaluate", pipeline.evaluate(cfg, model=args.model)))


def _run(cfg: Config, args: argparse.Namespace) -> None:
    summary = pipeline.run(cfg)
    print(pipeline.format_data(summary))
    print(pipeline.format_table(summary))
    print(f"model: {storage.redact(str(summary['model_dir']))}")


def _tune(cfg: Config, args: argparse.Namespace) -> None:
    manifest = pipeline.tune(cfg)
    print(tune.format_table(manifest["trials"], manifest["metric"], manifest["stats"]["base"]))
    target = tune.stage_dir(cfg)
    for name in ("results.csv", "results.parquet", "best.yaml", "metric_vs_param.png"):
        print(f"{name:<20}{storage.redact(storage.join(target, name))}")


def _audit(cfg: Config, args: argparse.Namespace) -> None:
    manifest = pipeline.audit(cfg)
    print(audit.format_table(manifest["stats"]))
    for name in ("audit.json", "audit.csv", "tradeoff.png", "fn_vs_perc.png", "report.html"):
        print(f"{name:<16}{storage.redact(storage.join(manifest['dir'], name))}")


# The verbs that run stages on a config: what each calls, under the output folder's lease.
STAGE_VERBS: dict[str, tuple[Callable[[Config, argparse.Namespace], None], str]] = {
    "embed": (_embed, "embed corpus and queries with the teacher (Ray Data)"),
    "mine": (_mine, "mine positive-aware hard negatives (runs embed/index when stale)"),
    "train": (_train, "fine-tune the student on mined examples (Ray Train)"),
    "evaluate": (_evaluate, "nDCG@10, Recall@k, MRR, MAP on held-out qrels"),
    "tune": (_tune, "Ray Tune search over mining rules and margins, scored on dev"),
    "run": (_run, "the whole pipeline: embed, mine, train, evaluate"),
    "audit": (_audit, "each mining setting's false negatives, with labelled positives hidden"),
}


VERBS = ("data", *STAGE_VERBS, "config", "report", "export")


def _staged(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    with _holding(cfg):
        STAGE_VERBS[args.verb][0](cfg, args)
    return 0


def _config_show(args: argparse.Namespace) -> int:
    """The config as the stages see it: the file, the overrides and every default, resolved."""
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _config_init(args: argparse.Namespace) -> int:
    """A commented starter config at `args.out`; an existing file is never overwritten."""
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out}: exists; name another file, or remove it first")
    out.write_text(starter_yaml(args.preset), encoding="utf-8")
    print(f"wrote {out}: posmine config show {out} prints it resolved")
    return 0


def _report(args: argparse.Namespace) -> int:
    manifest = storage.read_manifest(args.path) or {}
    if manifest.get("stage") == "mine":  # the histogram PNG, then the page
        print(storage.redact(report.histogram(args.path, args.out)))
    print(storage.redact(report.write_report(args.path)))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posmine",
        description="Positive-aware hard-negative mining and contrastive fine-tuning on Ray.",
    )
    p.add_argument("-v", "--verbose", action="store_true",
                   help="every log line on the terminal: Ray's, its workers' and posmine's debug lines")
    p.add_argument("--version", action="version", version=f"posmine {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    d = sub.add_parser("data", help="check a BEIR dataset")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    check = dsub.add_parser("check", help="validate a dataset and print its counts as JSON")
    check.add_argument("path", help="dataset folder, fsspec URL (s3://...), beir:<name>, a pairs/"
                                    "FlagEmbedding/NeMo file, a datasets folder, or hf:NAME[:SPLIT]")
    check.add_argument("--format", default="auto",
                       choices=("auto", "beir", "pairs", "flagembedding", "nemo"))
    check.set_defaults(func=_data)

    for name, (_, help_) in STAGE_VERBS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config (see jobs/configs/)")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        sp.set_defaults(func=_staged)
        if name == "evaluate":
            sp.add_argument("--model", default=None,
                            help="model to evaluate (default: teacher.model)")
    c = sub.add_parser("config", help="show a config resolved, with its defaults")
    csub = c.add_subparsers(dest="config_verb", required=True)
    show = csub.add_parser("show", help="print the resolved config (file, overrides, defaults) as YAML")
    show.add_argument("config", nargs="?", default=None, help="YAML config (default: all defaults)")
    show.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    show.set_defaults(func=_config_show)
    init = csub.add_parser("init", help="write a commented starter config")
    init.add_argument("out", nargs="?", default="posmine.yaml", help="file to write (default: posmine.yaml)")
    init.add_argument("--preset", choices=PRESETS, default=None,
                      help="a shipped recipe instead of every default")
    init.set_defaults(func=_config_init)
    r = sub.add_parser("report", help="report.html (and the score histogram PNG of a mine stage)")
    r.add_argument("path", help="a mine stage folder (<output.dir>/mine), an audit folder "
                                "(<output.dir>/audit/<hash>) or a run's output.dir")
    r.add_argument("--out", default=None, help="histogram PNG path (default: <mine dir>/scores.png)")
    r.set_defaults(func=_report)
    e = sub.add_parser("export", help="a mine stage's examples in sentence-transformers, "
                                      "FlagEmbedding, NeMo AutoModel or Parquet form")
    e.add_argument("mine_dir", help="a finished mine stage folder (<output.dir>/mine)")
    e.add_argument("out", help="output file (.parquet, or .jsonl for JSON lines); a folder for nemo")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--scores", action="store_true", help="add the teacher's scores")
    e.add_argument("--num-negatives", type=int, default=None,
                   help="st-n-tuple width (default: the mine stage's mining.num_negatives)")
    e.set_defaults(func=_export)
    return p


def _root_cause(e: BaseException) -> BaseException:
    """The error first raised, under Ray's wrappers (a task's error, Ray Train's failures).

    Only Ray's own wrappers are unwrapped: posmine's errors already say what went wrong.
    """
    for _ in range(20):  # wrappers nest a few levels at most
        inner = (getattr(e, "cause", None)  # RayTaskError
                 or next(iter((getattr(e, "worker_failures", None) or {}).values()), None)
                 or getattr(e, "controller_failure", None)
                 or (e.__cause__ if type(e).__module__.startswith("ray") else None))
        if not isinstance(inner, BaseException):
            return e
        e = inner
    return e


def _from_ray(e: BaseException) -> bool:
    return any(type(x).__module__.startswith("ray.") for x in (e, _root_cause(e)))


def _one_line(e: BaseException) -> str:
    """A message for the terminal: the first line of the root error, with its type if not ours."""
    root = _root_cause(e)
    text = (str(root).strip().splitlines() or [""])[0]
    return text if isinstance(root, _OURS) else f"{type(root).__name__}: {text}"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The verb's arguments; `key=value` overrides may also follow an option such as
    `evaluate CONFIG --model M k=v`, where argparse alone stops collecting them."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with terminal.session(args.verbose):
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """One verb, its errors as one line on stderr; the exit code."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kubectl delete, a scheduler's kill) stops as cleanly as Ctrl-C.
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except _OURS as e:
        print(f"posmine: error: {storage.redact(_one_line(e))}", file=sys.stderr)
        return 1
    except Exception as e:
        if not _from_ray(e):
            # A bug or an error nobody named: the whole traceback, but never a credential.
            print(storage.redact(traceback.format_exc()), file=sys.stderr)
            print(f"posmine: error: {storage.redact(_one_line(e))}", file=sys.stderr)
            return 1
        # A stage failed inside a Ray task, actor or Train worker: the whole error (Ray's
        # wrapper holds the worker's traceback) goes to the log file; one line, last, here.
        logging.getLogger(terminal.TRACE).error("failure inside Ray", exc_info=True)
        where = terminal.log_file() if terminal.quiet() else None
        hint = f"its traceback is in {where}" if where else "its traceback is above"
        print(f"posmine: error: {storage.redact(_one_line(e))}\n"
              f"(the failure happened in a Ray worker: {hint})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Finished stages and finished parts are kept; no manifest was written for the rest.
        print("posmine: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
