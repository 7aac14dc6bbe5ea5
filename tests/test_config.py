"""Run configs: the authors' YAML layout, validated with errors that name the key."""

import pytest

from minialg.config import load_config, parse_config


def test_official_yaml_with_nulls_takes_the_reference_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("""
model: {path: "THUDM/CogVideoX-5b-I2V", dtype: "bfloat16"}
generation: {height: null, width: null, num_frames: 49, num_inference_steps: 50, guidance_scale: 6.0}
alg: {use_low_pass_guidance: True, lp_filter_type: "down_up", lp_filter_in_latent: True, lp_blur_sigma: null,
      lp_resize_factor: 0.25, lp_strength_schedule_type: "interval", schedule_interval_end_time: 0.04}
video: {fps: 12}
""")
    config = load_config(str(tmp_path / "c.yaml"))
    assert config.model == "THUDM/CogVideoX-5b-I2V" and config.fps == 12
    assert config.generation == {"num_frames": 49, "num_inference_steps": 50, "guidance_scale": 6.0}
    assert config.alg.lp_blur_sigma == 15.0 and config.alg.schedule_interval_end_time == 0.04


@pytest.mark.parametrize("raw, message", [
    ({"modle": {}}, "unknown key 'modle'.*did you mean model"),
    ({"generation": {"num_frame": 9}}, "unknown key 'num_frame'.*did you mean num_frames"),
    ({"generation": {"num_frames": 9.5}}, "generation.num_frames has the wrong type"),
    ({"generation": {"use_dynamic_cfg": 1}}, "generation.use_dynamic_cfg has the wrong type"),
    ({"generation": {"height": True}}, "generation.height has the wrong type"),
    ({"generation": {"guidance_scale": -1.0}}, "generation.guidance_scale must not be negative"),
    ({"model": {"dtype": "float8"}}, "model.dtype must be one of"),
    ({"model": {"path": 3}}, "model.path must be"),
    ({"video": {"fps": 0}}, r"video.fps must be a number in \(0, 240\]"),
    ({"video": "fast"}, "section 'video' must be a mapping"),
    ({"alg": {"lp_filter_type": "box"}}, "lp_filter_type"),
])
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_presets_by_name_and_missing_config():
    assert load_config("wan_alg").alg.use_low_pass_guidance
    with pytest.raises(ValueError, match="config not found: nope.*wan_alg"):
        load_config("nope")
