"""The training config from the command line: `--config FILE.toml` and dotted `--section.key=value` overrides.

Read by `python -m c2a.train` (and torchrun) and `python -m c2a.plan`, which take the same recipe and keys.
A key may be spelled with dashes (`--data.skip-bad-rows`), as the argparse CLIs spell their flags.
"""

from __future__ import annotations

from pathlib import Path

from c2a.config import TrainConfig, build_config, config_keys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

USAGE = """usage: torchrun --nproc_per_node=N -m c2a.train [--config FILE.toml] [--section.key=value ...]
       python -m c2a.train [...]            (a single process)

With no --config, runs the embedded default: a small Llama fine-tuned on the bundled demo task, printing
its held-out exact-match accuracy before and after. Re-running the same command on the same out_dir
resumes from its latest complete checkpoint.
"""


def help_text() -> str:
    defaults = TrainConfig()
    lines = [USAGE, "options (key, default, meaning):"]
    for key, f in config_keys().items():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        lines.append(f"  --{key:<32} {value!r:<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> TrainConfig:
    """--config FILE and --key=value / --key value overrides -> TrainConfig. Raises ValueError/KeyError
    with a message for the user."""
    config_file = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --train.lr=1e-5 (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        if key == "config":
            config_file = value
        else:
            overrides[key.replace("-", "_")] = value
        i += 1
    values = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"--config {config_file}: no such file")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from e
    return build_config(values, overrides, source=str(config_file or "defaults"))


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)
