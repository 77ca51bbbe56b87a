import struct

import pytest

from serve.adapters import (
    AdapterCatalog,
    AdapterNotFound,
    AdapterSet,
    read_entry,
    split_prompt_tags,
)
from serve.errors import InvalidField


def test_adapter_set_is_canonical_whatever_the_order():
    a = AdapterSet.of([("b", 0.5), ("a", 1)])
    assert a == AdapterSet.of([("a", 1.0), ("b", 0.5)])
    assert a.key == "a@1+b@0.5" and a.names == ["a", "b"] and a.scales == [1.0, 0.5]
    assert AdapterSet.from_key(a.key) == a


def test_the_empty_set_is_the_base_model():
    assert not AdapterSet() and AdapterSet().key == "" and AdapterSet.from_key("") == AdapterSet()


def test_a_name_given_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        AdapterSet.of([("a", 1), ("a", 0.5)])


@pytest.mark.parametrize("prompt, cleaned, tags", [
    ("a cat <lora:pixel-art:0.6>", "a cat", [("pixel-art", 0.6)]),
    ("<lora:a:1> x  <lora:b> y", "x y", [("a", 1.0), ("b", None)]),
    ("no tags here", "no tags here", []),
])
def test_prompt_tags_are_read_and_removed(prompt, cleaned, tags):
    assert split_prompt_tags(prompt) == (cleaned, tags)


def test_a_tag_weight_that_is_not_a_number_names_the_prompt():
    with pytest.raises(InvalidField) as err:
        split_prompt_tags("x <lora:a:lots>")
    assert err.value.field == "prompt"


def _write_header(path, header: dict):
    import json

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_entries_describe_rank_and_layout_from_the_header(tmp_path):
    _write_header(tmp_path / "p.safetensors", {
        "unet.x.to_q.lora_A.weight": {"dtype": "F16", "shape": [16, 320], "data_offsets": [0, 0]},
        "unet.x.to_q.lora_B.weight": {"dtype": "F16", "shape": [320, 16], "data_offsets": [0, 0]}})
    _write_header(tmp_path / "k.safetensors", {
        "lora_unet_x_to_q.lora_down.weight": {"dtype": "F16", "shape": [8, 320],
                                              "data_offsets": [0, 0]}})
    p = read_entry(tmp_path / "p.safetensors", "sdxl", 0.8)
    k = read_entry(tmp_path / "k.safetensors", "sdxl", 1.0)
    assert (p.name, p.rank, p.layout, p.default_scale) == ("p", 16, "peft", 0.8)
    assert (k.rank, k.layout) == (8, "kohya")


@pytest.mark.parametrize("content", [b"", b"\x00" * 8 + b"x", struct.pack("<Q", 2**40),
                                     struct.pack("<Q", 2) + b"[]"])
def test_files_that_are_not_safetensors_are_refused(tmp_path, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(ValueError):
        read_entry(tmp_path / "bad.safetensors", "sdxl", 1.0)


def test_scan_keeps_only_readable_safetensors_loras(tmp_path):
    _write_header(tmp_path / "good.safetensors", {
        "unet.x.lora_A.weight": {"dtype": "F16", "shape": [4, 8], "data_offsets": [0, 0]}})
    _write_header(tmp_path / "no-lora.safetensors", {
        "unet.x.weight": {"dtype": "F16", "shape": [4, 8], "data_offsets": [0, 0]}})
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    (tmp_path / "bad name!.safetensors").write_bytes(b"")
    catalog = AdapterCatalog.scan([(tmp_path, "sdxl", 1.0)])
    assert list(catalog.entries) == ["good"]
    assert AdapterCatalog.from_dicts(catalog.to_dicts()).entries == catalog.entries
    with pytest.raises(AdapterNotFound):
        catalog.get("../good")


def test_files_in_subfolders_go_by_their_path_as_replicate_model_names(tmp_path):
    header = {"unet.x.lora_A.weight": {"dtype": "F16", "shape": [4, 8], "data_offsets": [0, 0]}}
    for name in ("top", "fofr/emoji", "fofr/emoji/v2", "a/b/c/too-deep", "bad owner/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write_header(tmp_path / f"{name}.safetensors", header)
    entries = AdapterCatalog.scan([(tmp_path, "flux", 1.0)]).entries
    assert sorted(entries) == ["fofr/emoji", "fofr/emoji/v2", "top"]
    assert entries["fofr/emoji/v2"].path == str(tmp_path / "fofr/emoji/v2.safetensors")
    assert AdapterSet.from_key(AdapterSet.of([("fofr/emoji", 0.5)]).key).names == ["fofr/emoji"]


def test_an_adapter_names_why_a_model_cannot_use_it():
    from serve.adapters import AdapterEntry
    from serve.config import ModelConfig

    model = ModelConfig(id="acme/sdxl", aliases=["stability-ai/sdxl"], embedded="tiny-sdxl",
                        max_lora_rank=16)
    entry = AdapterEntry("a", "/x", "sdxl", 1.0, 8, "peft")
    assert entry.problem_with(model) is None
    assert AdapterEntry("a", "/x", "stability-ai/sdxl", 1.0, 8, "peft").problem_with(model) is None
    assert "is for flux" in AdapterEntry("a", "/x", "flux", 1.0, 8, "peft").problem_with(model)
    assert "rank 32" in AdapterEntry("a", "/x", "sdxl", 1.0, 32, "peft").problem_with(model)


HF_FILE = "https://huggingface.co/acme/ink-lora/resolve/main/ink.safetensors"


@pytest.mark.parametrize("ref, url", [
    ("pixel-art", None),
    ("acme/ink-lora", None),  # a Replicate model name: not a URL
    (HF_FILE, HF_FILE),
    (HF_FILE.removeprefix("https://"), HF_FILE),  # Replicate's scheme-less form
    (HF_FILE.replace("/resolve/", "/blob/"), HF_FILE),  # the file's page
    ("huggingface.co/acme/ink-lora/", "https://huggingface.co/acme/ink-lora"),  # a repository
    (" http://127.0.0.1:8000/a.safetensors ", "http://127.0.0.1:8000/a.safetensors"),
    ("civitai.com/models/7/neon?modelVersionId=70",  # Replicate's CivitAI form
     "https://civitai.com/models/7/neon?modelVersionId=70"),
])
def test_a_reference_is_a_catalog_name_a_file_url_or_a_site_page(ref, url):
    from serve.adapters import adapter_url

    assert adapter_url(ref) == url


@pytest.mark.parametrize("ref", ["huggingface.co/acme", "huggingface.co/acme/ink-lora/tree/main",
                                 "https://huggingface.co/acme/ink-lora/resolve/main"])
def test_other_hugging_face_pages_are_refused_with_the_forms_to_use(ref):
    from serve.adapters import adapter_url

    with pytest.raises(InvalidField) as err:
        adapter_url(ref)
    assert err.value.field == "loras"
    assert "huggingface.co/<owner>/<repo>" in str(err.value)


def test_adapters_given_by_url_have_stable_names_and_urls_do_not_change_the_set():
    from serve.adapters import NAME, url_adapter_name

    name = url_adapter_name(HF_FILE)
    assert name == url_adapter_name(HF_FILE) != url_adapter_name(HF_FILE + "?v=2")
    assert NAME.match(name) and len(name) == 28
    with_url = AdapterSet.of([(name, 0.5)], [(name, HF_FILE)])
    assert with_url == AdapterSet.of([(name, 0.5)]) and with_url.key == f"{name}@0.5"
    assert with_url.urls == ((name, HF_FILE),)


def _url_router(**config):
    from serve.config import parse_config
    from serve.router import ModelRouter

    cfg = parse_config({"models": [{"id": "acme/fast", "embedded": "tiny-sdxl",
                                    "speed": {"fuse_qkv": True}},
                                   {"id": "acme/plain", "embedded": "tiny-sdxl"}], **config})
    return ModelRouter(cfg, AdapterCatalog.from_dicts([]), {}, metrics=None), cfg.models


def test_file_urls_are_taken_only_from_allowed_hosts_whatever_the_speed_settings():
    router, (fast, plain) = _url_router(lora_allowed_hosts=["huggingface.co", "*.hf.co"])
    got = router.adapters_for(plain, [(HF_FILE, None), ("https://cdn-lfs.hf.co/x", 0.7)])
    names = {url: name for name, url in got.urls}
    assert dict(got.items) == {names[HF_FILE]: 1.0, names["https://cdn-lfs.hf.co/x"]: 0.7}
    for ref in ("https://example.com/a.safetensors", "http://hf.co.evil.net/a",
                "https://evilhf.co/a"):
        with pytest.raises(InvalidField, match="not in this server's lora_allowed_hosts") as err:
            router.adapters_for(plain, [(ref, None)])
        assert err.value.field == "loras"
    assert router.adapters_for(fast, [(HF_FILE, None)]).names == [names[HF_FILE]]
    closed, (_, plain) = _url_router()
    with pytest.raises(InvalidField, match="lora_allowed_hosts"):
        closed.adapters_for(plain, [(HF_FILE, None)])
