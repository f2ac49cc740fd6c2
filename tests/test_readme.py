"""The README's ```python blocks run, in order, in one namespace (keeps the README true)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 3
  namespace: dict = {"__name__": "readme"}
  for i, code in enumerate(blocks):
    try:
      exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    except Exception as e:  # noqa: BLE001 - re-raised with the block number
      raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{code}") from e
  out = capsys.readouterr().out
  assert "'params/layers/mlp/kernel': 'lio'" in out
  assert "trainable" in out
  # The explain() table the README shows is what explain() prints.
  shown = re.search(r"```\n(path +layout +use\n.*?)```", README.read_text(), flags=re.S).group(1)
  for line in shown.strip().splitlines():
    assert line in out, line
