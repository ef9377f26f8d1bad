"""Settings: defaults, TOML, environment, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, Secret, Settings, iter_fields


def test_defaults_are_the_embedded_mode() -> None:
    s = Settings.load(environ={})
    assert s.model.default == "litemedsam"
    assert s.model.device == "auto"
    assert s.seg.color == "yellow"


def test_toml_then_environment_override(tmp_path: Path) -> None:
    cfg = tmp_path / "ainode.toml"
    cfg.write_text('data_dir = "/srv/ainode"\n[model]\ndevice = "cpu"\nthreads = 2\n[litemedsam]\nstop_iou = 0.6\n')
    s = Settings.load(cfg, environ={"AINODE_MODEL_THREADS": "1", "AINODE_SEG_LABEL": "Liver"})
    assert s.data_dir == "/srv/ainode"
    assert s.model.device == "cpu"
    assert s.model.threads == 1  # the environment wins over the file
    assert s.litemedsam.stop_iou == 0.6
    assert s.seg.label == "Liver"


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("log_level = 'DEBUG'\n")
    assert Settings.load(environ={"AINODE_CONFIG": str(cfg)}).log_level == "DEBUG"


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AINODE_MODEL_THREADS.*'many'.*int"):
        Settings.load(environ={"AINODE_MODEL_THREADS": "many"})
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nthreads = true\n")
    with pytest.raises(ConfigError, match="threads"):
        Settings.load(cfg, environ={})
    cfg.write_text("[modle]\ndevice = 'cpu'\n")
    with pytest.raises(ConfigError, match="unknown key.*modle"):
        Settings.load(cfg, environ={})
    cfg.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(cfg, environ={})
    with pytest.raises(ConfigError, match="cannot be read"):
        Settings.load(tmp_path / "missing.toml", environ={})


def test_secret_is_masked() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert secret.get_secret_value() == "hunter2"


def test_every_field_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [env for _key, env, _default in iter_fields() if f"`{env}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_every_field_has_a_comment() -> None:
    from config.settings import _iter_documented

    undocumented = [key for key, _env, _d, doc in _iter_documented(Settings, "") if not doc]
    assert not undocumented


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("kind", "ftp", "'dimse', 'dicomweb', 'xnat'"),
    ("auth", "kerberos", "'none', 'basic', 'bearer', 'jsession'"),
    ("xnat_upload", "email", "'auto', 'roi', 'import'"),
])
def test_a_closed_set_typo_fails_at_load_naming_the_key(tmp_path: Path, key: str, value: str, allowed: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[destinations.PACS]\nurl = "http://pacs/dicom-web"\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as exc:
        Settings.load(cfg, environ={})
    assert str(exc.value) == f"Config 'destinations.PACS.{key}' has value '{value}'. Not one of {allowed}."


def test_closed_sets_load_as_enums(tmp_path: Path) -> None:
    from config.settings import DestinationKind, HttpAuth, XnatUpload

    cfg = tmp_path / "c.toml"
    cfg.write_text('[destinations.PACS]\nkind = "DICOMweb"\nauth = " Bearer"\n[destinations.X]\nkind = "xnat"\n'
                   'xnat_upload = "roi"\n')
    s = Settings.load(cfg, environ={})
    pacs, xnat = s.destinations["PACS"], s.destinations["X"]
    assert pacs.kind is DestinationKind.DICOMWEB and pacs.auth is HttpAuth.BEARER
    assert xnat.kind is DestinationKind.XNAT and xnat.xnat_upload is XnatUpload.ROI and xnat.auth is HttpAuth.NONE
    assert pacs.kind == "dicomweb" and f"{pacs.kind}" == "dicomweb"  # still compares and prints as its value
    cfg.write_text("[destinations.PACS]\nkind = 3\n")
    with pytest.raises(ConfigError, match=r"'destinations.PACS.kind' has value 3\. Not a valid DestinationKind"):
        Settings.load(cfg, environ={})
