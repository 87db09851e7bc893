"""The audit's plan: every option checked before a model loads, and the encoder chosen by the caller, the policy's
``encoder:`` or the default, in that order."""

from __future__ import annotations

import dataclasses

import pytest
from audit_helpers import ALL_FLAG_POLICY

from safeclip.audit import AuditPlan, audit
from safeclip.embed import DEFAULT_MODEL, DEFAULT_PRETRAINED
from safeclip.errors import ConfigError, NoInputsError, OutputError

POLICY_WITH_ENCODER = ALL_FLAG_POLICY + "encoder: {model: ViT-L-14, pretrained: openai}\n"


@pytest.fixture
def no_model_env(monkeypatch):
    monkeypatch.delenv("SAFECLIP_MODEL", raising=False)
    monkeypatch.delenv("SAFECLIP_PRETRAINED", raising=False)


@pytest.fixture
def policy_file(tmp_path):
    p = tmp_path / "with-encoder.yaml"
    p.write_text(POLICY_WITH_ENCODER)
    return p


def test_the_encoder_is_the_callers_else_the_policys_else_the_default(policy_file, no_model_env, tmp_path):
    out = tmp_path / "a.parquet"
    plan = AuditPlan.create(["a.jpg"], out=out, policy=policy_file)
    assert (plan.encoder.model, plan.encoder.pretrained, plan.encoder_chosen_by) == ("ViT-L-14", "openai", "policy")
    plan = AuditPlan.create(["a.jpg"], out=out, policy=policy_file, model="ViT-B-16", pretrained="/m/b16.bin")
    assert (plan.encoder.model, plan.encoder.pretrained, plan.encoder_chosen_by) == ("ViT-B-16", "/m/b16.bin", "caller")
    # Only the weights named: the policy's architecture with the caller's checkpoint.
    plan = AuditPlan.create(["a.jpg"], out=out, policy=policy_file, pretrained="/m/l14.bin")
    assert (plan.encoder.model, plan.encoder.pretrained, plan.encoder_chosen_by) == ("ViT-L-14", "/m/l14.bin", "caller")
    no_encoder = tmp_path / "no-encoder.yaml"
    no_encoder.write_text(ALL_FLAG_POLICY)
    plan = AuditPlan.create(["a.jpg"], out=out, policy=no_encoder)
    assert (plan.encoder.model, plan.encoder.pretrained, plan.encoder_chosen_by) == (DEFAULT_MODEL, DEFAULT_PRETRAINED, "default")


def test_the_environment_counts_as_the_caller(policy_file, monkeypatch, tmp_path):
    monkeypatch.setenv("SAFECLIP_MODEL", "ViT-B-16")
    monkeypatch.setenv("SAFECLIP_PRETRAINED", "/m/b16.bin")
    plan = AuditPlan.create(["a.jpg"], out=tmp_path / "a.parquet", policy=policy_file)
    assert (plan.encoder.model, plan.encoder.pretrained, plan.encoder_chosen_by) == ("ViT-B-16", "/m/b16.bin", "caller")


def test_a_loaded_encoder_is_the_callers(tiny_encoder, policy_file, tmp_path):
    plan = AuditPlan.create(["a.jpg"], out=tmp_path / "a.parquet", policy=policy_file, encoder=tiny_encoder)
    assert plan.loaded_encoder is tiny_encoder and plan.encoder_chosen_by == "caller"
    assert (plan.encoder.model, plan.encoder.pretrained) == (tiny_encoder.model_name, tiny_encoder.pretrained)


def test_defaults_are_applied_once(tmp_path):
    from safeclip.decode import DecodeLimits

    plan = AuditPlan.create(["b.jpg", "a.jpg", "b.jpg"], out=tmp_path / "a.parquet", progress=None, verbose=False,
                            decode_limits=DecodeLimits(timeout_s=20))
    assert plan.inputs == ("b.jpg", "a.jpg")  # in order, each once
    assert plan.task_timeout == 300.0 and plan.progress is False and plan.policy.id == "default@1.0"
    assert plan.engine.name == "local" and plan.output.part_rows == 2048
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.output.part_rows = 1  # type: ignore[misc]


def test_bad_options_fail_before_anything_loads(tmp_path):
    out = tmp_path / "a.parquet"
    with pytest.raises(NoInputsError, match="no inputs"):
        AuditPlan.create([], out=out)
    with pytest.raises(OutputError, match="is a folder"):
        AuditPlan.create(["a.jpg"], out=tmp_path)
    with pytest.raises(ConfigError, match="engine must be 'local' or 'ray'"):
        AuditPlan.create(["a.jpg"], out=out, engine="spark")
    with pytest.raises(ConfigError, match="--address needs --engine ray"):
        AuditPlan.create(["a.jpg"], out=out, address="auto")
    with pytest.raises(ConfigError, match="ray_options"):
        AuditPlan.create(["a.jpg"], out=out, ray_options={"stall_timeout": 5})
    with pytest.raises(ConfigError, match=r"unknown ray_options \['stall'\]"):
        AuditPlan.create(["a.jpg"], out=out, engine="ray", ray_options={"stall": 5})
    for bad in ({"part_rows": 0}, {"workers": 0}, {"batch_size": 0}, {"task_timeout": 0}):
        with pytest.raises(ConfigError):
            AuditPlan.create(["a.jpg"], out=out, **bad)
    with pytest.raises(ConfigError, match="decode_batch"):
        AuditPlan.create(["a.jpg"], out=out, engine="ray", ray_options={"decode_batch": 0})
    plan = AuditPlan.create(["a.jpg"], out=out, engine="ray", ray_options={"stall_timeout": 5, "actors": 2})
    assert (plan.engine.ray.stall_timeout, plan.engine.ray.actors, plan.engine.ray.decode_batch) == (5, 2, 32)
    # audit() validates through the plan: nothing is started for a wrong option.
    with pytest.raises(ConfigError, match="engine must be"):
        audit(["a.jpg"], out=out, engine="spark")
    assert not out.exists() and not (tmp_path / "a.parquet.parts").exists()


def test_no_inputs_says_what_the_folder_walk_left_out(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(NoInputsError, match=r"skipped 1 file\(s\) in the folders \(1 not an image\).*--all-files"):
        AuditPlan.create([tmp_path], out=tmp_path / "o.parquet", model="ViT-B-32", pretrained="/models/b32.bin")


def test_runtime_precision_and_threads_are_checked_and_reach_the_encoder(tmp_path):
    from safeclip.audit.plan import encoder_kwargs

    plan = AuditPlan.create(["a.jpg"], out=tmp_path / "o.parquet", model="ViT-B-32", pretrained="/models/b32.bin",
                            runtime="onnx", precision="int8", threads=2)
    assert encoder_kwargs(plan.encoder) == {"runtime": "onnx", "precision": "int8", "threads": 2, "spin_wait": True}
    # On a CPU the decode workers share the cores: ONNX Runtime's idle threads must not spin (issue 23).
    assert encoder_kwargs(plan.encoder, "cpu")["spin_wait"] is False
    assert encoder_kwargs(plan.encoder, "cuda:0")["spin_wait"] is True
    for bad in ({"runtime": "tensorrt"}, {"precision": "fp8"}, {"threads": 0}):
        with pytest.raises(ConfigError):
            AuditPlan.create(["a.jpg"], out=tmp_path / "o.parquet", model="ViT-B-32", pretrained="/b.bin", **bad)


def test_option_groups_are_value_objects_each_component_gets_its_own(tmp_path):
    """Issue 20: the options travel as value objects; the keyword form maps onto the same fields."""
    from safeclip.audit import EngineOptions, OutputOptions
    from safeclip.embed import DecodeOptions, EncoderSpec

    spec = EncoderSpec(model="ViT-B-32", pretrained="/m/b32.bin", threads=2)
    grouped = AuditPlan.create(["a.jpg"], policy="default", encoder=spec, decoding=DecodeOptions(workers=3),
                               output=OutputOptions(tmp_path / "o.parquet", part_rows=7),
                               engine=EngineOptions(worker_nice=5))
    keywords = AuditPlan.create(["a.jpg"], out=tmp_path / "o.parquet", policy="default", model="ViT-B-32",
                                pretrained="/m/b32.bin", threads=2, workers=3, part_rows=7, worker_nice=5)
    for name in ("encoder", "decoding", "output", "engine", "encoder_chosen_by"):
        assert getattr(grouped, name) == getattr(keywords, name), name
    with pytest.raises(ConfigError, match="unexpected keyword argument.*'modle'"):
        AuditPlan.create(["a.jpg"], out=tmp_path / "o.parquet", modle="ViT-B-32")
