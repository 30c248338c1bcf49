"""Each fact has one home: the generation parameters (shelfsight/params.py), the Triton contract's names
(shelfsight/serving/contract.py), the device presets (shelfsight/engine/config.py), the ports
(shelfsight/ports.py) and every command's defaults (the settings objects the flags fill)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from shelfsight import params, ports
from shelfsight.app.cli import build_parser
from shelfsight.engine import PRESETS
from shelfsight.errors import InvalidArgument
from shelfsight.params import GenerationParams
from shelfsight.serving import contract


def test_contract_optional_inputs_are_the_parameters_then_enhance():
    assert list(contract.OPTIONAL) == [*params.FIELDS, "enhance"]
    assert [f.name for f in dataclasses.fields(GenerationParams) if f.name != "ignore_eos"] == list(params.FIELDS)
    sent = GenerationParams(seed=5, ignore_eos=True).as_request()  # what the gateway sends on to Triton
    assert list(sent) == list(params.FIELDS) and sent["seed"] == 5


@pytest.mark.parametrize("p", [GenerationParams(), GenerationParams(seed=7, temperature=0.0, top_k=0),
                               GenerationParams(seed=params.MAX_SEED, max_new_tokens=1)])
def test_parameters_travel_as_one_json_value(p):
    assert GenerationParams.from_json(p.to_json(), params.Limits()) == p
    assert GenerationParams.from_json(p.to_json().decode(), params.Limits()) == p


def test_ignore_eos_never_travels():
    raw = GenerationParams(ignore_eos=True).to_json()
    assert "ignore_eos" not in raw.decode() and not GenerationParams.from_json(raw, params.Limits()).ignore_eos


def _with(**change) -> bytes:
    doc = json.loads(GenerationParams().to_json())
    doc.update(change)
    return json.dumps({k: v for k, v in doc.items() if v != "DROP"}).encode()


@pytest.mark.parametrize("raw, message", [
    (b"not json", "not a JSON object"), (b"[1, 2]", "not a JSON object"),
    (_with(beam=4), "unknown generation parameters ['beam']"),
    (_with(ignore_eos=True), "unknown generation parameters ['ignore_eos']"),
    (_with(top_k="DROP"), "generation parameters lack ['top_k']"),
    (_with(temperature="x"), "temperature must be a float, got 'x'"),
    (_with(seed=params.MAX_SEED + 1), "seed must be between 0 and 2^63-1"),
    (_with(seed=-1), "seed must be between 0 and 2^63-1"),
    (_with(max_new_tokens=5000), "max_new_tokens must be between 1 and 2048"),
])
def test_generate_checks_the_parameters_it_is_handed(raw, message):
    # a direct client of `generate` skips preprocess: the engine must never see these
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        GenerationParams.from_json(raw, params.Limits())


def _configs(repo: Path) -> dict[str, str]:
    return {d.name: (d / "config.pbtxt").read_text() for d in repo.iterdir() if (d / "config.pbtxt").exists()}


def _inputs(config: str) -> dict[str, str]:
    block = config[config.index("input ["):config.index("]\noutput")]
    return dict(re.findall(r'name: "(\w+)" data_type: (\w+)', block))


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tmp_path_factory):
    from shelfsight.export.repository import RepositoryJob, build

    out = tmp_path_factory.mktemp("one-source") / "repo"
    served = build(RepositoryJob(model=tiny_checkpoint, out=out, device="gpu", max_batch=4))
    return out, served


def test_ensembles_take_every_parameter_as_an_optional_input(repository):
    configs = _configs(repository[0])
    assert set(configs) == {"preprocess", "generate", "collect", *contract.ANSWERS_FROM}
    for name in (*contract.ANSWERS_FROM, "preprocess"):
        inputs = _inputs(configs[name])
        for field, rule in params.RULES.items():
            assert inputs[field.upper()] == contract.CONFIG_TYPE[rule.triton_type], (name, field)
            assert re.search(rf'name: "{field.upper()}" [^}}]*optional: true', configs[name]), (name, field)
    for name, answers_from in contract.ANSWERS_FROM.items():  # one template, two contracts
        assert f'name: "{name}"' in configs[name] and f'model_name: "{answers_from}"' in configs[name]
        for field in params.FIELDS:
            assert f'input_map {{ key: "{field.upper()}" value: "{field.upper()}" }}' in configs[name]


def test_steps_pass_the_resolved_parameters_as_one_tensor(repository):
    configs = _configs(repository[0])
    for name in ("generate", "collect"):
        assert list(_inputs(configs[name])) == list(contract.STEP_INPUTS), name
    assert 'name: "params" data_type: TYPE_STRING' in configs["preprocess"].split("output [")[1]
    for text in configs.values():  # no step names a parameter in lower case any more
        assert not any(f'"{field}"' in text for field in params.FIELDS)


def test_device_preset_comes_from_the_engine_config(repository):
    served, gpu = repository[1], PRESETS["gpu"]
    assert (served.device, served.dtype) == (gpu.device, gpu.dtype)
    assert served.engine == dataclasses.replace(gpu.engine, max_batch=4)
    assert 'kind: KIND_GPU' in _configs(repository[0])["generate"]
    with pytest.raises(InvalidArgument, match="--device must be one of cpu, gpu, got 'tpu'"):
        from shelfsight.engine import preset
        preset("tpu")


def test_study_settings_are_the_serving_defaults(tiny_checkpoint):
    from shelfsight.evaluation.run import STUDY_SETTINGS
    from shelfsight.export.repository import generation_defaults

    assert all(getattr(GenerationParams(), k) == v for k, v in STUDY_SETTINGS.items())
    served = generation_defaults(tiny_checkpoint, 99)
    assert dataclasses.replace(served, max_new_tokens=256, top_k=GenerationParams.top_k) == GenerationParams()


# ---- every flag's default is its settings object's ----

def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_gateway_flags_default_to_gateway_settings():
    from shelfsight.gateway.cli import settings_from
    from shelfsight.gateway.settings import GatewaySettings

    args = parse("gateway")
    assert settings_from(args, args.triton) == GatewaySettings()
    assert (GatewaySettings().port, GatewaySettings().metrics_port) == (ports.GATEWAY, ports.GATEWAY_METRICS)


def test_serve_flags_default_to_the_settings_they_fill(tmp_path):
    from shelfsight.export.cli import repository_job
    from shelfsight.export.repository import RepositoryJob
    from shelfsight.gateway.settings import GatewaySettings
    from shelfsight.serving.supervisor import RestartPolicy

    args = parse("serve", "--model", str(tmp_path))
    assert repository_job(args, tmp_path, tmp_path / "out") == RepositoryJob(model=tmp_path, out=tmp_path / "out")
    assert (args.port, args.metrics_port, args.max_in_flight) == (GatewaySettings.port, GatewaySettings.metrics_port,
                                                                  GatewaySettings.max_in_flight)
    assert (args.triton_grpc_port, args.triton_http_port, args.triton_metrics_port) == (
        ports.TRITON_GRPC, ports.TRITON_HTTP, ports.TRITON_METRICS)
    assert args.max_restarts == RestartPolicy.max_failures


def test_client_side_flags_default_to_their_settings():
    from shelfsight.loadtest.runner import LoadJob
    from shelfsight.ui.cli import settings_from
    from shelfsight.ui.settings import UISettings

    assert settings_from(parse("ui")) == UISettings()
    for argv in (("ask", "x.jpg", "q"), ("batch", "folder", "--out", "o"), ("eval",), ("ui",),
                 ("loadtest", "--scenario", "hot", "--out", "o")):
        assert parse(*argv).target == ports.GATEWAY_ADDRESS, argv
    assert parse("loadtest", "--scenario", "hot", "--out", "o").max_new_tokens == LoadJob.max_new_tokens
    ask = parse("ask", "x.jpg", "q")
    assert all(getattr(ask, field) is None for field in params.FIELDS)  # unset: the server's defaults
    assert parse("ask", "x.jpg", "q", "--top-k", "5", "--seed", "3").top_k == 5
