"""The README's library example runs as written (with the tiny fixture for the HF path)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(tmp_path, fixtures_dir):
    """Every python block of the README, in order, in one namespace (8 fake CPU devices)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    code = "\n".join(blocks).replace('"path/to/DeepSeek-V3"', repr(str(fixtures_dir / "hf_tiny_bf16")))
    code = code.replace('"out/"', repr(str(tmp_path / "out")))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "config.json").exists()
    assert namespace["loss"].shape == () and namespace["grads"]["weights"]["embed"].shape == (512, 64)
