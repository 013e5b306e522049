"""Model card, push to the Hub and the packaged accuracy metric, all without the network.

The upload is tested three ways: a recording fake `api`; the real `HfApi` against a loopback stub that speaks
just enough of the Hub's upload protocol (repo create, validate-yaml, preupload, NDJSON commit); and the real
`HfApi` against a closed port. A guard fails any test that tries to connect anywhere but loopback.
"""

import base64
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import evaluate
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, constants
from huggingface_hub.repocard_data import model_index_to_eval_results
from tiny_models import make_model
from transformers import ViTImageProcessor

from flora_hf import FloraSupernetForImageClassification, count_macs, count_params
from flora_hf.errors import CheckpointError, FloraError, HubError, SearchSpaceError
from flora_hf.hub import card_template, push_to_hub, render_model_card
from flora_hf.metrics import ACCURACY_METRIC_DIR, load_accuracy_metric

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "localhost")
TOKEN = "hf_stub_token"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection to a non-loopback address fails the test instead of reaching the network."""
    connect = socket.socket.connect

    def guarded(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"test tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the loopback tests need requests to go out


@pytest.fixture
def offline_evaluate(monkeypatch):
    """HF_HUB_OFFLINE=1 / HF_EVALUATE_OFFLINE=1, also in the module constants read at import time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)


# a compact model and its card -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported():
    dense = make_model("vit")
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    subnet = supernet.space.sample(random.Random(3))
    size = dense.config.image_size
    compact = supernet.export_subnet(subnet, image_processor=ViTImageProcessor(size={"height": size, "width": size}))
    return dense, subnet, compact


def card_for(exported, **overrides):
    dense, subnet, compact = exported
    kwargs = dict(
        base_model="google/vit-base-patch16-224",
        dataset="digits",
        accuracy=0.875,
        dense_accuracy=0.9,
        dense_macs=count_macs(dense),
        dense_params=count_params(dense),
        search_settings={"max_macs": 250_000, "population": 50, "filter": "keep | 30%"},
        subnet=subnet,
        repo_id="someone/tiny-vit-flora",
    )
    return render_model_card(compact, **{**kwargs, **overrides})


@pytest.fixture
def compact_folder(tmp_path, exported):
    compact = exported[2]
    compact.model_card = card_for(exported)
    try:
        compact.save_pretrained(tmp_path / "compact")
    finally:
        compact.model_card = None
    return tmp_path / "compact"


def test_card_metadata_comes_from_model_card_data_and_round_trips(exported):
    card = ModelCard(card_for(exported))
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert {"flora", "low-rank", "vision-transformer"} <= set(data.tags)
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.datasets == ["digits"]
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split) == ("image-classification", "digits", "test")
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.875)
    assert data.model_name == "tiny-vit-flora"
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "tiny-vit-flora" and results == data.eval_results


def test_card_body_compares_with_dense_and_maps_every_rank(exported):
    dense, subnet, compact = exported
    text = ModelCard(card_for(exported)).text
    macs, dense_macs = count_macs(compact), count_macs(dense)
    assert f"| MACs per image | {dense_macs / 1e3:.2f} K | {macs / 1e3:.2f} K | {macs / dense_macs:.1%}" in text
    params, dense_params = count_params(compact), count_params(dense)
    assert f"| Parameters | {dense_params / 1e3:.2f} K | {params / 1e3:.2f} K | {params / dense_params:.1%}" in text
    assert "| Top-1 accuracy (digits, test) | 90.00% | 87.50% | -2.50 pt |" in text
    ranks = compact.config.flora_ranks
    for index in range(dense.config.num_hidden_layers):
        cells = []
        for suffix in ("attention.qkv", "mlp.fc1", "mlp.fc2"):
            group = f"vit.layers.{index}.{suffix}"
            cells.append(f"{'dense' if ranks[group] is None else ranks[group]} ({float(subnet[group])})")
        assert f"| `vit.layers.{index}` | {' | '.join(cells)} |" in text
    assert "| max_macs | 250000 |" in text and "| filter | keep \\| 30% |" in text  # a pipe cannot break the table
    assert 'from_pretrained("someone/tiny-vit-flora", trust_remote_code=True)' in text
    assert 'pipeline("image-classification", model="someone/tiny-vit-flora", trust_remote_code=True)' in text
    assert json.dumps(subnet, indent=2) in text


def test_rank_map_has_one_row_per_block(kind):
    dense = make_model(kind)
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    compact = supernet.export_subnet(supernet.space.min_subnet())
    text = render_model_card(compact, base_model=None, dataset="digits", accuracy=None, dense_accuracy=None,
                             dense_macs=count_macs(dense), dense_params=count_params(dense))
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [block[0].name.rsplit(".", 2)[0] for block in supernet.space.blocks]
    assert ModelCard(text).data.pipeline_tag == "image-classification"


def test_card_without_measurements_has_no_model_index(exported):
    card = ModelCard(card_for(exported, accuracy=None, dense_accuracy=None, search_settings=None, subnet=None,
                              base_model=None, repo_id=None))
    assert card.data.eval_results is None and card.data.base_model is None
    assert "model-index" not in card.data.to_dict() and "metrics" not in card.data.to_dict()
    assert "| not measured | not measured | n/a |" in card.text
    assert "## Search settings" not in card.text and "<details>" not in card.text
    assert "a dense ViT classifier" in card.text


def test_card_rejects_bad_input(exported):
    with pytest.raises(FloraError, match="fractions in \\[0, 1\\]"):
        card_for(exported, accuracy=87.5)
    with pytest.raises(SearchSpaceError, match="does not have"):
        card_for(exported, subnet={"vit.layers.9.mlp.fc1": 0.5})
    with pytest.raises(CheckpointError, match="not a compact flora-hf model"):
        render_model_card(make_model("vit"), base_model=None, dataset="digits", accuracy=None, dense_accuracy=None,
                          dense_macs=1, dense_params=1)


def test_saved_card_is_the_readme(compact_folder, exported):
    assert ModelCard.load(compact_folder / "README.md").content == card_for(exported)


# packaging ------------------------------------------------------------------------------------------------------
def test_template_loads_through_importlib_resources():
    template = resources.files("flora_hf.hub_cards").joinpath("flora_model_card.md")
    assert template.is_file() and "{{ card_data }}" in card_template()
    assert (REPO_ROOT / "hub_cards" / "flora_model_card.md").read_text() == card_template()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_pyproject_lists_every_package():
    """pyproject lists packages explicitly (for the hub_cards mapping): a new subpackage must be added there."""
    import tomllib

    setuptools_config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts) for init in (REPO_ROOT / "flora_hf").rglob("__init__.py")
    }
    assert on_disk | {"flora_hf.hub_cards"} <= set(setuptools_config["packages"])
    assert setuptools_config["package-dir"]["flora_hf.hub_cards"] == "hub_cards"


def test_wheel_ships_templates_and_metric(tmp_path, offline_evaluate):
    """A real (non-editable) build: the card template and the metric script load from the installed package."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("flora_hf", "hub_cards"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist", source]
    subprocess.run(build, check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("flora_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"flora_hf/hub_cards/flora_model_card.md", "flora_hf/metrics/flora_accuracy/flora_accuracy.py"} <= names
    assert not any(name.startswith("hub_cards/") for name in names)
    install = [*pip, "install", "--no-deps", "--no-index", "-q", "--target", tmp_path / "site", wheel]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    script = (
        "import sys, flora_hf.hub, flora_hf.metrics\n"
        "assert flora_hf.__file__.startswith(sys.argv[1]), flora_hf.__file__\n"
        "assert '{{ card_data }}' in flora_hf.hub.card_template()\n"
        "print(flora_hf.metrics.ACCURACY_METRIC_DIR)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    installed_metric = Path(done.stdout.strip().splitlines()[-1])
    assert installed_metric == tmp_path / "site" / "flora_hf" / "metrics" / "flora_accuracy"
    metric = evaluate.load(str(installed_metric))  # what load_accuracy_metric() does in that install
    assert metric.compute(predictions=[[0.0, 1.0], [2.0, 1.0]], references=[1, 1]) == {"top1": 0.5, "top5": 1.0}


# push: recorded calls -------------------------------------------------------------------------------------------
class RecordingApi:
    endpoint = "https://hub.example"

    def __init__(self, fail_with=None):
        self.calls, self.fail_with = [], fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_with is not None:
            raise self.fail_with

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return CommitInfo(commit_url=f"{self.endpoint}/{kwargs['repo_id']}/commit/{'a' * 40}", commit_message="",
                          commit_description="", oid="a" * 40, _endpoint=self.endpoint)


def test_push_calls_create_repo_then_upload_folder(compact_folder):
    api = RecordingApi()
    url = push_to_hub(compact_folder, "someone/tiny", token="tok", private=True, commit_message="msg", api=api)
    assert url == f"https://hub.example/someone/tiny/commit/{'a' * 40}"
    assert api.calls == [
        ("create_repo", "someone/tiny", {"token": "tok", "private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"folder_path": str(compact_folder), "repo_id": "someone/tiny", "repo_type": "model",
                           "token": "tok", "commit_message": "msg"}),
    ]


def test_push_refuses_anything_but_a_compact_checkpoint(tmp_path, compact_folder):
    api = RecordingApi()
    make_model("vit").save_pretrained(tmp_path / "dense")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(compact_folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    for folder, match in [
        (tmp_path / "dense", "'vit' checkpoint, not a flora-hf compact model"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "file", "not a directory"),
        (tmp_path / "missing", "not a directory"),
        (no_weights, "no model.safetensors"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            push_to_hub(folder, "someone/tiny", api=api)
    assert api.calls == []


@pytest.mark.parametrize("error", [
    huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled"),
    pytest.importorskip("requests").ConnectionError("Max retries exceeded"),
    ConnectionResetError("connection reset by peer"),
], ids=["offline", "requests", "builtin"])
def test_push_turns_connection_failures_into_hub_error(compact_folder, error):
    with pytest.raises(HubError, match=f"^could not reach the Hugging Face Hub at https://hub.example: {error}$"):
        push_to_hub(compact_folder, "someone/tiny", api=RecordingApi(fail_with=error))


# push: the real HfApi against a loopback stub of the Hub ----------------------------------------------------------
class StubHub(ThreadingHTTPServer):
    """Just enough of the Hub's upload protocol for `create_repo` + `upload_folder` of regular (non-LFS) files."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests, self.created, self.validated, self.preuploaded, self.lfs = [], [], [], [], []
        self.files, self.commit_messages = {}, []
        self.yaml_errors = []  # messages validate-yaml answers with (400); none: the card is accepted


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a connection may stay silent before the handler thread gives up

    def log_message(self, *args):
        pass

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_GET(self):
        self.server.requests.append(("GET", self.path, self.headers.get("authorization")))
        self.reply(404, {"error": f"Repository not found: {self.path}"})

    def do_POST(self):
        hub, path = self.server, self.path.split("?")[0]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        hub.requests.append(("POST", path, self.headers.get("authorization")))
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            payload = json.loads(body)
            hub.created.append(payload)
            return self.reply(200, {"url": f"{hub.endpoint}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            hub.validated.append(json.loads(body)["content"])
            return self.reply(400 if hub.yaml_errors else 200, {"errors": [{"message": m} for m in hub.yaml_errors]})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            hub.preuploaded.extend(files)
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self.reply(200, {"files": modes})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            assert self.headers["Content-Type"] == "application/x-ndjson"
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    hub.commit_messages.append(item["value"]["summary"])
                elif item["key"] == "file":
                    hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    hub.lfs.append(item)
            oid = hashlib.sha1(body).hexdigest()
            commit_url = f"{hub.endpoint}/{parts[2]}/{parts[3]}/commit/{oid}"
            return self.reply(200, {"commitUrl": commit_url, "commitOid": oid})
        return self.reply(404, {"error": f"no route {path}"})


@pytest.fixture
def stub_hub():
    hub = StubHub()
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=10)


def bounded(function, timeout=60.0):
    """Runs `function` in a thread and fails the test if it has not returned after `timeout` seconds."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"gave up after {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "single-commit"])
def test_push_with_real_hf_api_to_stub_hub(stub_hub, compact_folder, monkeypatch, xet):
    """huggingface_hub's streamed upload (hf_xet installed) and its single-commit path both deliver every file."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    api = HfApi(endpoint=stub_hub.endpoint)
    url = bounded(lambda: push_to_hub(compact_folder, "someone/tiny", token=TOKEN, commit_message="add model", api=api))
    local = {path.name: path.read_bytes() for path in compact_folder.iterdir() if path.is_file()}
    expected = {"README.md", "config.json", "model.safetensors", "modeling_flora.py", "preprocessor_config.json"}
    assert expected <= set(local)
    assert stub_hub.files == local
    assert stub_hub.lfs == []
    assert sorted(f["path"] for f in stub_hub.preuploaded) == sorted(local)
    assert {f["path"]: f["size"] for f in stub_hub.preuploaded} == {name: len(data) for name, data in local.items()}
    assert stub_hub.created == [{"name": "tiny", "organization": "someone", "visibility": "public", "type": "model"}]
    assert stub_hub.commit_messages == ["add model"]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in stub_hub.requests)
    assert url.startswith(f"{stub_hub.endpoint}/someone/tiny/commit/")
    # the card's YAML goes to the Hub's validate-yaml endpoint first (the stub accepts it; the real rules are remote)
    assert stub_hub.validated and set(stub_hub.validated) == {local["README.md"].decode()}


def test_push_rejected_by_hub_is_a_hub_error(stub_hub, compact_folder):
    api = HfApi(endpoint=stub_hub.endpoint)
    with pytest.raises(HubError) as caught:
        bounded(lambda: push_to_hub(compact_folder, "someone/tiny", token="hf_wrong", api=api))
    message = str(caught.value)
    assert message.startswith(f"the Hugging Face Hub at {stub_hub.endpoint} refused to publish someone/tiny: ")
    assert "401" in message and "Invalid credentials" in message and "HF_TOKEN" in message
    assert stub_hub.files == {}


def test_card_rejected_by_hub_is_a_hub_error(stub_hub, compact_folder):
    stub_hub.yaml_errors = ['"datasets[0]" must be a dataset id']
    with pytest.raises(HubError, match="rejected the model card of someone/tiny: (?s:.*)must be a dataset id"):
        bounded(lambda: push_to_hub(compact_folder, "someone/tiny", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint)))
    assert stub_hub.files == {}


def test_push_to_unreachable_hub_is_a_hub_error(compact_folder):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(HubError, match=f"^could not reach the Hugging Face Hub at {endpoint}: "):
        bounded(lambda: push_to_hub(compact_folder, "someone/tiny", token=TOKEN, api=HfApi(endpoint=endpoint)))


def test_push_in_offline_mode_is_a_hub_error(compact_folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="could not reach the Hugging Face Hub at http://127.0.0.1:9: .*offline mode"):
        api = HfApi(endpoint="http://127.0.0.1:9")
        bounded(lambda: push_to_hub(compact_folder, "someone/tiny", token=TOKEN, api=api))


# accuracy metric -------------------------------------------------------------------------------------------------
@pytest.fixture
def offline_metric(offline_evaluate):
    return load_accuracy_metric()


def test_metric_is_loaded_from_the_package(offline_metric):
    assert (ACCURACY_METRIC_DIR / "flora_accuracy.py").is_file()
    assert ACCURACY_METRIC_DIR.is_absolute() and ACCURACY_METRIC_DIR.parent.parent.name == "flora_hf"
    assert offline_metric.name == "flora_accuracy"


def test_metric_matches_torch_topk(offline_metric):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    expected_top1 = (logits.argmax(-1) == labels).float().mean().item()
    expected_top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    for start in range(0, 64, 16):  # batches accumulate like in an evaluation loop
        batch = slice(start, start + 16)
        offline_metric.add_batch(predictions=logits[batch].tolist(), references=labels[batch].tolist())
    result = offline_metric.compute()
    assert result == pytest.approx({"top1": expected_top1, "top5": expected_top5})
    assert 0 < result["top1"] < result["top5"] < 1


def test_metric_clips_top5_and_breaks_ties_like_argmax(offline_metric):
    three_classes = [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.2, 0.3, 0.1]]
    assert offline_metric.compute(predictions=three_classes, references=[0, 1, 0]) == {"top1": 0.0, "top5": 1.0}
    ties = [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]] * 3
    result = offline_metric.compute(predictions=ties, references=[0, 4, 5])
    assert result == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    assert int(np.argmax(ties[0])) == 0
    with pytest.raises(ValueError, match="class ids"):
        offline_metric.compute(predictions=three_classes, references=[0, 1, 3])
