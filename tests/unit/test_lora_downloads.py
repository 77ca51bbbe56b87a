"""LoRA files given by URL, downloaded from a real local HTTP server."""

import asyncio
import json
import time

import pytest
import torch
from safetensors.torch import save, save_file

import deployments.lora_downloads
from deployments.lora_downloads import AdapterDownloads, DownloadSettings, download_file
from serve.adapters import AdapterInvalid
from tests.conftest import FileServer, trickling

LORA = save({"unet.down.lora_A.weight": torch.ones(4, 8),
             "unet.down.lora_B.weight": torch.zeros(8, 4)})


def _siblings(*names):
    return json.dumps({"siblings": [{"rfilename": n} for n in names]}).encode()


def _file(name, version, fmt="SafeTensor", primary=False):
    return {"name": name, "type": "Model", "primary": primary, "metadata": {"format": fmt},
            "downloadUrl": f"https://civitai.com/api/download/models/{version}"}


def _civitai_model(kind, versions):
    """CivitAI's answer for a model: its type and versions, newest first."""
    return json.dumps({"type": kind, "modelVersions": [
        {"id": vid, "files": files} for vid, files in versions]}).encode()


@pytest.fixture(scope="module")
def server():
    """127.0.0.1 serves the files, and stands for Hugging Face (its model API and
    /resolve/ downloads) and CivitAI (its model API and downloads); /away, /acme/two's
    file and CivitAI's version 71 redirect to `localhost`, another host."""
    away = "http://localhost:{port}/a.safetensors"
    served = FileServer(
        {"/a.safetensors": LORA, "/big": b"x" * 3000, "/text": b"<html>a model card</html>",
         "/api/models/acme/one": _siblings("README.md", "style.safetensors"),
         "/api/models/acme/two": _siblings("a.safetensors", "lora.safetensors",
                                           "sub/pytorch_lora_weights.safetensors"),
         "/api/models/acme/many": _siblings("a.safetensors", "b.safetensors"),
         "/acme/one/resolve/main/style.safetensors": LORA,
         "/api/v1/models/7": _civitai_model("LORA", [(71, [_file("new.safetensors", 71)]),
                                                     (70, [_file("old.safetensors", 70)])]),
         "/api/v1/model-versions/70": json.dumps({
             "id": 70, "model": {"type": "LORA"}, "files": [
                 _file("old.ckpt", 70, "PickleTensor", primary=True),
                 _file("old.safetensors", 70)]}).encode(),
         "/api/v1/models/8": _civitai_model("Checkpoint", [(80, [_file("sdxl.safetensors", 80)])]),
         "/api/v1/models/9": _civitai_model("LORA", [(90, [_file("x.pt", 90, "PickleTensor")])]),
         "/api/download/models/70": LORA},
        {"/moved": "http://127.0.0.1:{port}/a.safetensors", "/away": away,
         "/acme/two/resolve/main/lora.safetensors": away,
         "/api/download/models/71": away})
    yield served
    served.close()


ALLOWED = ("127.0.0.1",)


def test_a_file_is_saved_whole_and_redirects_within_allowed_hosts_are_followed(server, tmp_path):
    url = server.url
    for path in ("/a.safetensors", "/moved"):
        dest = tmp_path / f"{path[1:]}.safetensors"
        download_file(url + path, dest, ALLOWED, 10_000)
        assert dest.read_bytes() == LORA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors.safetensors",
                                                         "moved.safetensors"]


@pytest.mark.parametrize("path, reason", [
    ("/away", "leads to http://localhost:.*, whose host is not in this server's lora_allowe"),
    ("/missing", "gave HTTP 404"),
    ("/big", "is over lora_download_max_mb"),
])
def test_refused_downloads_say_why_and_leave_no_file(server, tmp_path, path, reason):
    url = server.url
    with pytest.raises(AdapterInvalid, match=reason):
        download_file(url + path, tmp_path / "x.safetensors", ALLOWED, 2000)
    assert list(tmp_path.iterdir()) == []


def test_a_host_that_cannot_be_reached_is_an_invalid_adapter(tmp_path):
    with pytest.raises(AdapterInvalid, match="could not download the LoRA at .*ConnectError"):
        download_file("http://127.0.0.1:9/a.safetensors", tmp_path / "x.safetensors",
                      ALLOWED, 2000)


def _run_in_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_a_host_that_trickles_the_file_is_cut_off_and_leaves_no_file(tmp_path, monkeypatch):
    """Every read comes within the per-read time-out; the whole download has its own."""
    monkeypatch.setattr(deployments.lora_downloads, "_DOWNLOAD_TOTAL_S", 1)
    sent = []

    async def download():
        server = await asyncio.start_server(trickling(LORA, sent), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/slow.safetensors"
        async with server:
            with pytest.raises(AdapterInvalid) as refused:
                await asyncio.to_thread(download_file, url, tmp_path / "slow.safetensors",
                                        ALLOWED, 2**20)
            return refused.value, time.monotonic()

    refused, ended = asyncio.run(download())
    assert "took over 1s" in str(refused) and "slow.safetensors" in str(refused)
    assert 5 <= len(sent) < 40 and ended - sent[0] < 3  # cut off midway, not at the end
    assert list(tmp_path.iterdir()) == []


def test_concurrent_requests_share_one_download_and_later_ones_use_the_file(server, tmp_path):
    downloads = AdapterDownloads(DownloadSettings(tmp_path, ALLOWED, 10_000))
    lora = f"{server.url}/a.safetensors?shared"

    async def three():
        first = await asyncio.gather(*(downloads.entry("url-1", lora, "acme/m", _run_in_thread)
                                       for _ in range(2)))
        return [*first, await downloads.entry("url-1", lora, "acme/m", _run_in_thread)]

    entries = asyncio.run(three())
    assert server.paths.count("/a.safetensors?shared") == 1
    assert {(e.name, e.base, e.rank, e.layout) for e in entries} == {
        ("url-1", "acme/m", 4, "peft")}
    assert (tmp_path / "url-1.safetensors").read_bytes() == LORA


def test_a_file_that_is_not_a_lora_is_refused_and_not_kept(server, tmp_path):
    url = server.url
    downloads = AdapterDownloads(DownloadSettings(tmp_path, ALLOWED, 10_000))
    with pytest.raises(AdapterInvalid, match="is not a safetensors LoRA"):
        asyncio.run(downloads.entry("url-2", f"{url}/text", "acme/m", _run_in_thread))
    save_file({"w": torch.ones(2)}, str(tmp_path / "url-3.safetensors"))  # no LoRA keys
    with pytest.raises(AdapterInvalid, match="no LoRA weights"):
        asyncio.run(downloads.entry("url-3", f"{url}/text", "acme/m", _run_in_thread))
    assert list(tmp_path.iterdir()) == []


def test_the_folder_is_trimmed_to_its_size_by_last_use_never_the_new_file(tmp_path):
    import os

    from deployments.lora_downloads import trim_folder

    for i, name in enumerate(["old", "used", "new"]):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x" * 1000)
        os.utime(tmp_path / f"{name}.safetensors", (i, [1, 3, 2][i]))  # "used" is newest
    assert trim_folder(tmp_path, 5000, tmp_path / "new.safetensors") == []
    assert trim_folder(tmp_path, 1500, tmp_path / "new.safetensors") == [
        tmp_path / "old.safetensors", tmp_path / "used.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["new.safetensors"]


def test_add_skips_held_adapters_and_downloads_again_a_file_that_was_trimmed(server, tmp_path):
    from serve.config import ModelConfig

    model = ModelConfig(id="acme/m", embedded="tiny-sdxl", max_lora_rank=2)
    downloads = AdapterDownloads(DownloadSettings(tmp_path, ALLOWED, 10_000, cache_bytes=1))
    lora, catalog = f"{server.url}/a.safetensors?add", {}

    def add(name, held=(), rank=4):
        served = model.model_copy(update={"max_lora_rank": rank})
        asyncio.run(downloads.add([(name, lora)], catalog, held, served, _run_in_thread))

    with pytest.raises(AdapterInvalid, match=r"adapter http://.*\?add has rank 4, above this "
                                             "model's max_lora_rank 2"):
        add("url-a", rank=2)
    add("url-a")
    add("url-a")  # its file is there: no download
    assert catalog["url-a"].rank == 4 and server.paths.count("/a.safetensors?add") == 1
    (tmp_path / "url-a.safetensors").unlink()
    add("url-a", held=["url-a"])  # in memory: nothing to do
    assert server.paths.count("/a.safetensors?add") == 1
    add("url-a")
    assert server.paths.count("/a.safetensors?add") == 2 and (tmp_path / "url-a.safetensors").exists()


def test_a_hugging_face_repository_gives_its_lora_file_and_the_token_stays_on_the_hub(
        server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # a mirror: the local server stands for it
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("CIVITAI_TOKEN", "civ_x")  # not for the hub
    hosts = ("127.0.0.1", "localhost")
    download_file("https://huggingface.co/acme/one", tmp_path / "one.safetensors", hosts,
                  10_000)
    assert (tmp_path / "one.safetensors").read_bytes() == LORA
    assert server.auth("/api/models/acme/one") == "Bearer hf_x"
    assert server.auth("/acme/one/resolve/main/style.safetensors") == "Bearer hf_x"
    # Of several files, the one trainers name so; its download redirects to another host
    # (as the hub's file CDN is), which gets no token.
    download_file("https://huggingface.co/acme/two", tmp_path / "two.safetensors", hosts,
                  10_000)
    assert (tmp_path / "two.safetensors").read_bytes() == LORA
    assert server.auth("/acme/two/resolve/main/lora.safetensors") == "Bearer hf_x"
    assert server.requests[-1] == ("/a.safetensors", None)


@pytest.mark.parametrize("repo, reason", [
    ("acme/many", (r"has 2 top-level .safetensors files \(a.safetensors, b.safetensors\); "
                   r"give one: https://huggingface.co/acme/many/resolve/main/<file>")),
    ("acme/none", "looking up the Hugging Face repository acme/none gave HTTP 404"),
])
def test_a_repository_without_one_lora_file_is_refused_saying_why(server, tmp_path,
                                                                  monkeypatch, repo, reason):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(AdapterInvalid, match=reason):
        download_file(f"https://huggingface.co/{repo}", tmp_path / "x.safetensors", ALLOWED,
                      10_000)
    assert list(tmp_path.iterdir()) == []


def test_a_civitai_model_page_gives_its_newest_or_chosen_versions_safetensors_file(
        server, tmp_path, monkeypatch):
    monkeypatch.setenv("CIVITAI_ENDPOINT", server.url)  # a proxy: the local server stands in
    monkeypatch.setenv("CIVITAI_TOKEN", "civ_x")
    monkeypatch.setenv("HF_TOKEN", "hf_x")  # not for CivitAI
    hosts = ("127.0.0.1", "localhost")
    download_file("https://civitai.com/models/7/neon-style", tmp_path / "new.safetensors",
                  hosts, 10_000)
    assert (tmp_path / "new.safetensors").read_bytes() == LORA
    assert server.auth("/api/v1/models/7") == "Bearer civ_x"
    assert server.auth("/api/download/models/71") == "Bearer civ_x"
    assert server.requests[-1] == ("/a.safetensors", None)  # the CDN it redirects to: none
    download_file("https://civitai.com/models/7?modelVersionId=70",
                  tmp_path / "old.safetensors", hosts, 10_000)
    assert (tmp_path / "old.safetensors").read_bytes() == LORA
    assert server.paths[-2:] == ["/api/v1/model-versions/70", "/api/download/models/70"]


@pytest.mark.parametrize("page, reason", [
    ("models/8", "the CivitAI model 8 is a Checkpoint, not a LoRA"),
    ("models/9", "the CivitAI model 9 has no SafeTensor file to download"),
    ("models/5", "looking up the CivitAI model 5 gave HTTP 404"),
])
def test_a_civitai_model_that_is_no_lora_file_is_refused_before_any_download(
        server, tmp_path, monkeypatch, page, reason):
    monkeypatch.setenv("CIVITAI_ENDPOINT", server.url)
    before = len(server.requests)
    with pytest.raises(AdapterInvalid, match=reason):
        download_file(f"https://civitai.com/{page}", tmp_path / "x.safetensors", ALLOWED,
                      10_000)
    assert [p for p in server.paths[before:] if "/download/" in p] == []
    assert list(tmp_path.iterdir()) == []
