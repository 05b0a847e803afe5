"""The README's library example runs as written (with the tiny fixture for the HF path)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_library_example_runs(tmp_path, fixtures_dir):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace('"path/to/DeepSeek-V3"', repr(str(fixtures_dir / "hf_tiny_bf16")))
    code = code.replace('"out/"', repr(str(tmp_path / "out")))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape[-1] == namespace["cfg"].vocab_size
    assert (tmp_path / "out" / "config.json").exists()
