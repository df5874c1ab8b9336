"""The README examples of the e2b and e2b-code-interpreter packages, as written there, and the
calls around them the issue names: run_code timeouts, commands.list, envs per command."""

import pytest


def test_e2b_readme_example(capsys):
    from e2b import Sandbox

    with Sandbox.create() as sandbox:
        result = sandbox.commands.run('echo "Hello from E2B!"')
        print(result.stdout)  # Hello from E2B!
    assert capsys.readouterr().out == "Hello from E2B!\n\n"


def test_code_interpreter_readme_example(capsys):
    from e2b_code_interpreter import Sandbox

    with Sandbox.create() as sandbox:
        sandbox.run_code("x = 1")
        execution = sandbox.run_code("x+=1; x")
        print(execution.text)  # outputs 2
    assert capsys.readouterr().out == "2\n"


def test_run_code_timeout_raises_and_the_context_lives_on():
    from e2b.exceptions import TimeoutException
    from e2b_code_interpreter import Sandbox

    with Sandbox.create() as sandbox:
        sandbox.run_code("y = 5")
        with pytest.raises(TimeoutException):
            sandbox.run_code("import time\nwhile True: time.sleep(0.1)", timeout=2)
        assert sandbox.run_code("y + 1").text == "6"


def test_commands_list_and_envs_per_command():
    from e2b import Sandbox

    with Sandbox.create(envs={"FROM_SANDBOX": "s"}) as sandbox:
        handle = sandbox.commands.run("sleep 30", background=True)
        assert handle.pid in [p.pid for p in sandbox.commands.list()]
        result = sandbox.commands.run(
            'echo "$FROM_SANDBOX $FROM_COMMAND"', envs={"FROM_COMMAND": "c"}
        )
        assert result.stdout == "s c\n"
        handle.kill()
