"""Data plane, the code interpreter on port 49999 (needs the agent's /e2b/ci routes)."""

import pytest
from e2b_code_interpreter import Sandbox


@pytest.fixture(scope="module")
def ci():
    sandbox = Sandbox.create(timeout=600)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_text_result_and_stdout(ci):
    out = []
    execution = ci.run_code("print('hi'); 6*7", on_stdout=lambda m: out.append(m.line))
    assert execution.text == "42"
    assert execution.logs.stdout == ["hi\n"]
    assert out and out[0].startswith("hi")


def test_state_persists(ci):
    ci.run_code("x = 20")
    assert ci.run_code("x + 1").text == "21"


def test_error(ci):
    execution = ci.run_code("1/0")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"


def test_matplotlib_png(ci):
    execution = ci.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    )
    assert any(r.png for r in execution.results), execution


def test_contexts(ci):
    ctx = ci.create_code_context(cwd="/tmp")
    assert ctx.id
    assert ci.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    assert ctx.id in [c.id for c in ci.list_code_contexts()]
    ci.restart_code_context(ctx)
    ci.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in ci.list_code_contexts()]


def test_javascript(ci):
    assert ci.run_code("1 + 2", language="js").text == "3"
