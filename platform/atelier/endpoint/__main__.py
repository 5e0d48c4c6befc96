"""`python -m atelier.endpoint`: regenerate the committed serving example (a test checks it)."""

from atelier.endpoint.rayservice import EXAMPLE, example_yaml

EXAMPLE.parent.mkdir(parents=True, exist_ok=True)
EXAMPLE.write_text(example_yaml())
print(EXAMPLE)
