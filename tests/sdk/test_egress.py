"""The egress API through the SDK: a sandbox created with a network policy, its policy read,
patched and pruned with ``get_egress_policy`` / ``patch_egress_rules`` /
``delete_egress_rules``, and a sandbox created without one (loopback only)."""

from opensandbox import Sandbox
from opensandbox.models.sandboxes import NetworkPolicy, NetworkRule

from conftest import IMAGE, make_config, stdout_texts


def test_egress_policy_round_trip(aio):
    async def main():
        sbx = await Sandbox.create(
            IMAGE,
            connection_config=make_config(),
            network_policy=NetworkPolicy(
                default_action="deny",
                egress=[NetworkRule(action="allow", target="example.invalid")],
            ),
        )
        try:
            first = await sbx.get_egress_policy()
            await sbx.patch_egress_rules(
                [
                    NetworkRule(action="allow", target="*.example.invalid"),
                    NetworkRule(action="deny", target="example.invalid"),
                ]
            )
            patched = await sbx.get_egress_policy()
            await sbx.delete_egress_rules(["*.example.invalid"])
            pruned = await sbx.get_egress_policy()
            # The sandbox has a device, and a denied name is NXDOMAIN on it.
            resolved = await sbx.commands.run(
                "getent hosts example.invalid || echo nxdomain"
            )
            return first, patched, pruned, resolved
        finally:
            await sbx.kill()
            await sbx.close()

    first, patched, pruned, resolved = aio.run(main())
    assert first.default_action == "deny"
    assert [(r.action, r.target) for r in first.egress] == [("allow", "example.invalid")]
    assert [(r.action, r.target) for r in patched.egress] == [
        ("allow", "*.example.invalid"),
        ("deny", "example.invalid"),
    ]
    assert [(r.action, r.target) for r in pruned.egress] == [("deny", "example.invalid")]
    assert stdout_texts(resolved) == ["nxdomain"]


def test_no_policy_means_loopback_only(aio, sandbox):
    execution = aio.run(sandbox.commands.run("cat /proc/net/dev | grep -c eth0 || true"))
    assert stdout_texts(execution) == ["0"]
    policy = aio.run(sandbox.get_egress_policy())
    assert policy.default_action == "deny"
    assert not policy.egress
