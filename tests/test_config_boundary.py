"""Typed configuration all the way down: below megatron/config/ nothing reads keys of `run.args`.

`run.args` is the dict of the run's final flag values: checkpoints save it and wandb/TensorBoard receive it, so
passing it along whole is fine. Reading a key from it (`run.args["x"]`, `run.args.get("x")`, `"x" in run.args`,
or the same through a name bound to it) would make it a second source of truth next to the dataclasses; every
value code below config/ needs is a typed field of RunConfig instead. The config package itself must not import
the layers above it at module level (training/, convert/, optimizer/, data/)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = ("pretrain_gpt.py", "pretrain_gpt_alcf.py")


def _is_run_args(node: ast.AST, aliases: set) -> bool:
    """`run.args`, `self.run.args`, `x.run.args`, or a name bound to one of them (`args = run.args`)."""
    if isinstance(node, ast.Name):
        return node.id in aliases
    if not (isinstance(node, ast.Attribute) and node.attr == "args"):
        return False
    base = node.value
    return (isinstance(base, ast.Name) and base.id == "run") or (isinstance(base, ast.Attribute) and base.attr == "run")


def run_args_key_reads(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: text' for every key read of the run's args dict in `source`."""
    tree = ast.parse(source, filename)
    aliases = set()
    for node in ast.walk(tree):  # names bound to run.args, or to dict(run.args)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict" \
                    and len(value.args) == 1:
                value = value.args[0]
            if _is_run_args(value, set()):
                aliases.add(node.targets[0].id)
    found = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Subscript):  # run.args["x"]
            target = node.value
        elif isinstance(node, ast.Attribute) and node.attr in ("get", "pop", "setdefault", "items", "keys",
                                                               "values", "__getitem__", "__contains__"):
            target = node.value  # run.args.get("x")
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            target = next((c for c in node.comparators if _is_run_args(c, aliases)), None)  # "x" in run.args
        if target is not None and _is_run_args(target, aliases):
            found.append((node.lineno, f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}"))
    return [text for _, text in sorted(found)]


def _files_below_config():
    for path in sorted((ROOT / "megatron").rglob("*.py")):
        if (ROOT / "megatron" / "config") not in path.parents:
            yield path
    for name in ENTRY_SCRIPTS:
        if (ROOT / name).exists():
            yield ROOT / name


def test_the_checker_finds_key_reads_and_allows_passing_the_dict_whole():
    reads = run_args_key_reads(
        "a = run.args['x']\nb = run.args.get('y')\nc = 'z' in self.run.args\nd = dict(run.args)\ne = d['w']\n"
        "f = run.args\nif f.get('v'):\n    pass\n")
    assert [r.split(":")[1] for r in reads] == ["1", "2", "3", "5", "7"], reads
    assert run_args_key_reads("Tracker(run.logging, config=run.args)\nsave(args=dict(run.args))\n"
                              "x = error.args[0]\ny = checkpoint.args.get('vocab_size')\n") == []


def test_no_run_args_key_read_below_config():
    found = []
    files = list(_files_below_config())
    assert len(files) > 20 and any(f.name == "loop.py" for f in files)
    for path in files:
        found += run_args_key_reads(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, ("read these values from RunConfig's typed fields (megatron/config/), not from run.args:\n"
                       + "\n".join(found))


def test_config_does_not_import_the_layers_above_it():
    """Importing megatron.config.arguments (the whole config package) loads none of training/, convert/,
    optimizer/, data/, checkpoint/ or model/: the import graph stays acyclic."""
    code = ("import sys, megatron.config, megatron.config.arguments\n"
            "import megatron.config.argtypes, megatron.config.reliability, megatron.config.optimizer_args\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in ([ 'megatron', p] for p in "
            "('training', 'convert', 'optimizer', 'data', 'checkpoint', 'model', 'distributed')))\n"
            "print(' '.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"megatron.config imports {out.stdout.strip()} at module level"
