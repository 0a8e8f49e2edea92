"""The gateway config: validation with errors naming the field, defaults from the papers, `--check`."""

from __future__ import annotations

import hashlib
import json

import pytest
import typer
from typer.testing import CliRunner

from moelab.cli.serve import register
from moelab.gateway.config import GatewayConfig, load_config
from moelab.gateway.policy import Decision, RequestRouter, register_policy


@register_policy("test_cfg_first", paper="test", summary="first candidate")
class FirstPolicy(RequestRouter):
    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def route(self, request):
        return Decision(request.models[0].name, self.name, self.weight)


def base(**extra):
    cfg = {
        "models": [
            {"name": "small", "base_url": "http://127.0.0.1:9001/v1/", "api_key_env": "CFG_TEST_SMALL_KEY"},
            {
                "name": "big",
                "base_url": "http://127.0.0.1:9002/v1",
                "cost_per_1k_input": 0.01,
                "context_window": 8192,
            },
        ],
        "policies": {"first": {"type": "test_cfg_first", "weight": 0.5}},
    }
    cfg.update(extra)
    return cfg


def error_of(cfg) -> str:
    with pytest.raises(ValueError) as e:
        load_config(cfg)
    return str(e.value)


def test_minimal_config_and_defaults():
    cfg = load_config(base())
    assert isinstance(cfg, GatewayConfig)
    assert [m.name for m in cfg.models] == ["small", "big"]
    assert cfg.models[0].base_url == "http://127.0.0.1:9001/v1"  # trailing slash dropped
    assert cfg.default_policy == "first"  # the only policy is the default
    assert cfg.policies["first"].params() == {"weight": 0.5}
    # vLLM-SR's semantic cache defaults (PAPERS.md §E.27): similarity 0.82, TTL 7200 s
    assert (cfg.cache.threshold, cfg.cache.ttl_s, cfg.cache.enabled) == (0.82, 7200.0, False)
    assert cfg.state == "memory" and cfg.cooldown.failures == 3 and cfg.retries.count == 2
    assert load_config(cfg) is cfg


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"models": []}, "models: List should have at least 1 item"),
        ({"models": [{"name": "x", "base_url": "ftp://nope"}]}, "models.0.base_url: expected an http(s) URL"),
        ({"models": [{"name": "auto", "base_url": "http://h/v1"}]}, "models.0.name: 'auto' and names"),
        (
            {"models": [{"name": "x", "base_url": "http://h/v1", "cost_per_1k_input": -1}]},
            "models.0.cost_per_1k_input",
        ),
        (
            {"models": [{"name": "x", "base_url": "http://h/v1", "api_key": "sk-123"}]},
            "models.0.api_key: Extra inputs",
        ),
        ({"fallbacks": {"chains": {"small": ["huge"]}}}, "fallbacks.chains.small: unknown model(s) ['huge']"),
        ({"fallbacks": {"default": ["nope"]}}, "fallbacks.default: unknown model(s) ['nope']"),
        ({"default_policy": "other"}, "default_policy: expected one of the configured policies ['first']"),
        (
            {"policies": {"p": {"type": "no_such_policy"}}},
            "policies.p.type: expected a registered request router",
        ),
        ({"policies": {"p": {"weight": 1}}}, "policies.p.type: Field required"),
        ({"state": "postgres://x"}, "state: expected 'memory' or 'redis://host:port/db'"),
        ({"retry": {"count": 1}}, "retry: Extra inputs are not permitted"),
        ({"retries": {"count": -1}}, "retries.count: Input should be greater than or equal to 0"),
        ({"cooldown": {"failures": 0}}, "cooldown.failures"),
        ({"cache": {"threshold": 1.5}}, "cache.threshold"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        (
            {"auth": {"keys": [{"id": "k", "sha256": "my-plain-key"}]}},
            "auth.keys.0.sha256: expected the key's sha256",
        ),
        (
            {"auth": {"keys": [{"id": "k", "sha256": "0" * 64, "models": ["zzz"]}]}},
            "auth.keys[k].models: unknown model",
        ),
    ],
)
def test_bad_config_names_the_field(change, expect):
    assert expect in error_of(base(**change))


def test_duplicate_models_and_bad_policy_params():
    dup = base(models=[{"name": "a", "base_url": "http://h/v1"}, {"name": "a", "base_url": "http://h/v1"}])
    assert "names must be unique, repeated: ['a']" in error_of(dup)
    from moelab.gateway.app import create_app

    with pytest.raises(
        ValueError, match=r"policies.first: policy 'test_cfg_first': bad parameters \['bogus'\]"
    ):
        create_app(base(policies={"first": {"type": "test_cfg_first", "bogus": 1}}))


def test_files_yaml_json_and_errors(tmp_path):
    import yaml

    y = tmp_path / "gw.yaml"
    y.write_text(yaml.safe_dump(base()))
    j = tmp_path / "gw.json"
    j.write_text(json.dumps(base()))
    assert load_config(y) == load_config(str(j)) == load_config(base())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping at the top level, got list"):
        load_config(lst)
    with pytest.raises(TypeError, match="expects a path, a dict or a GatewayConfig, got int"):
        load_config(3)


def test_api_keys_come_from_the_environment(monkeypatch):
    cfg = load_config(base())
    monkeypatch.delenv("CFG_TEST_SMALL_KEY", raising=False)
    assert cfg.models[0].api_key() is None and cfg.secrets() == []
    monkeypatch.setenv("CFG_TEST_SMALL_KEY", "sk-from-env-0001")
    assert cfg.models[0].api_key() == "sk-from-env-0001" and cfg.secrets() == ["sk-from-env-0001"]
    assert "sk-from-env" not in cfg.model_dump_json()  # the config holds only the variable's name


def _cli():
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # keep `serve` a sub-command
        pass

    return app


def test_serve_check_prints_a_summary_without_the_key(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("CFG_TEST_SMALL_KEY", "sk-never-print-me-42")
    key_hash = hashlib.sha256(b"gateway-key").hexdigest()
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(base(auth={"keys": [{"id": "team", "sha256": key_hash}]})))
    res = CliRunner().invoke(_cli(), ["serve", "--config", str(path), "--check"])
    assert res.exit_code == 0, res.output
    assert "is valid" in res.output and "small: http://127.0.0.1:9001/v1" in res.output
    assert "key from $CFG_TEST_SMALL_KEY" in res.output and "auth: 1 key(s)" in res.output
    assert "first (test_cfg_first)" in res.output
    assert "sk-never-print-me-42" not in res.output and key_hash not in res.output
    path.write_text(yaml.safe_dump(base(state="nosql")))
    res = CliRunner().invoke(_cli(), ["serve", "--config", str(path), "--check"])
    assert res.exit_code == 2 and "state: expected 'memory'" in res.output
    res = CliRunner().invoke(_cli(), ["serve", "--config", str(path), "--workers", "0"])
    assert res.exit_code == 2 and "--workers must be >= 1" in res.output
