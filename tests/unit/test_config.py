import pytest

from ssl_dist.config import Config, ConfigError, flatten, load_config, to_yaml

pytestmark = pytest.mark.unit


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = Config()
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 0.1\nmethod:\n  name: moco_v3\n")
    cfg = load_config(path, ["optim.lr=0.5", "scaling.num_workers=[1, 4]", "zero.stage=2"])
    assert cfg.optim.lr == 0.5
    assert cfg.method.name == "moco_v3"
    assert cfg.scaling.num_workers == (1, 4)
    assert cfg.zero.stage == 2
    assert flatten(cfg)["optim.lr"] == 0.5


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key"),
        ("method.name=no_such_method", "method.name: must be one of"),
        ("data.batch_size=0", "data.batch_size"),
        ("zero.stage=4", "zero.stage"),
        ("views.crop_scale=[0.9, 0.1]", "views.crop_scale"),
        ("scaling.num_workers=[3, 1]", "scaling.num_workers"),
        ("optim=3", "optim"),
        ("nonsense", "must look like key.sub=value"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_every_field_is_documented():
    def walk(model):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):
                walk(ann)
            else:
                assert f.description, f"{model.__name__}.{name} has no docstring"

    for f in Config.model_fields.values():
        walk(f.annotation)
