"""The docs run as written (issue 25): every shell block of README.md and docs/*.md marked `<!-- cpu-runnable -->`
runs, in order, in a scratch directory that sees the repository's files, shrunk by the environment variables the
README documents (TRAIN_ITERS, SHARDS, MAX_MB, VOCAB_SIZE). Blocks of one file share the directory: the Data
section's run is what the Checkpoints section converts. The README's launch block (torchrun, then mpiexec) is run
by tests/test_launch.py, one launch at a time, which also checks what each launch prints. Also: the documents
agree with the code on the points issue 25 found, and the variables the scripts export are documented."""

import re

import pytest

from docs_blocks import DOCS, ROOT, SHRINK, launch_block, run_block, runnable_blocks, scratch


def test_runnable_blocks_are_found_where_the_issue_asks():
    readme = runnable_blocks((ROOT / "README.md").read_text())
    joined = "\n".join(readme)
    assert len(readme) >= 4
    # the Data section goes from a corpus to a training run on it, with the tokenizer's flags
    data = next(block for block in readme if "build_corpus.py" in block)
    assert "preprocess_data.py" in data and "for jsonl in data/corpus/*/*.jsonl" in data
    assert re.search(r"pretrain_gpt\.py .*--data-file-list data/corpus/data_file_list\.txt", data, re.S)
    assert "--tokenizer-type Llama2Tokenizer --tokenizer-model data/tokenizer/tokenizer.model" in \
        data.split("pretrain_gpt.py", 1)[1]
    assert "MOCK_DATA=1 DRY_RUN=1 bash ALCF/train_aurora.sh" in joined
    for name in SHRINK:  # every shrinking variable is documented
        assert f"`{name}`" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", [d for d in DOCS if runnable_blocks(d.read_text())], ids=lambda d: d.name)
def test_every_cpu_runnable_block_runs_as_written(doc, tmp_path):
    directory = scratch(tmp_path)
    for block in runnable_blocks(doc.read_text()):
        if doc.name == "README.md" and block == launch_block():
            continue  # tests/test_launch.py runs it
        run_block(block, directory, doc.name)


def test_the_variables_the_scripts_export_are_documented():
    exported = set()
    for script in (ROOT / "ALCF" / "demo_cpu.sh", ROOT / "tests" / "run_all.sh", *(ROOT / "examples").glob("*.sh")):
        for statement in re.findall(r"^export (.*?)(?<!\\)$", script.read_text(), re.M | re.S):
            exported |= set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", statement))
    exported.discard("PATH")
    readme = (ROOT / "README.md").read_text()
    assert exported, "no exports found"
    assert sorted(name for name in exported if f"`{name}`" not in readme) == []


def test_the_documents_agree_with_the_code():
    readme = (ROOT / "README.md").read_text()
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    reliability = (ROOT / "docs" / "RELIABILITY.md").read_text()
    for name in re.findall(r"\b([A-Z]+\.md)\b", architecture + reliability + readme):  # no missing design file
        assert name in {"README.md", "RESULTS.md", "cooldown.md"} or (ROOT / "docs" / name).exists(), name
    assert "the memory maps of `.idx` and `.bin`) is retried" not in reliability  # training reads with preadv
    assert "without memory\nmaps" in reliability or "without memory maps" in reliability
    from megatron.data.blend_report import REPORT_JSON

    assert REPORT_JSON in readme and REPORT_JSON in architecture
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    untracked = {"data", "runs", "checkpoints", "outputs", "build", "wandb", "__pycache__"}  # .gitignore's
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in untracked and not p.name.endswith(".egg-info")}
    for folder in sorted(folders):
        assert f"{folder}/" in layout, f"README's Layout leaves out {folder}/"
    for package in sorted(p.name for p in (ROOT / "megatron").iterdir() if (p / "__init__.py").exists()):
        assert f"megatron/{package}/" in layout, f"README's Layout leaves out megatron/{package}/"
    assert "torchrun` returns 1" in reliability and "exitcode  : 2" in reliability
