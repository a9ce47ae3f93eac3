"""Prepared data by URL: a real HTTP server on 127.0.0.1 serves a prepared folder; the loader, `verify` and
pretraining stream from it; a server that drops the connection mid-shard is an error naming the shard, never a
silently short epoch; `loader.shard_url` reads shards through any `pipe:` command."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo


class _Handler(http.server.SimpleHTTPRequestHandler):
    drop: set = set()  # request paths answered with half the body, then the connection closed

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.path.lstrip("/") in self.drop:
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()


@pytest.fixture
def server(uneven_dataset, monkeypatch, tmp_path):
    root, _ = uneven_dataset
    monkeypatch.setenv("JEPA4REC_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(_Handler, directory=str(root.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.drop = set()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/{root.name}"
    httpd.shutdown()
    httpd.server_close()


def _keys(root, workers=2, **loader):
    cfg = load_config(overrides=["--loader.batch_size=4", f"--loader.num_workers={workers}",
                                 *(f"--loader.{k}={v}" for k, v in loader.items())])
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    collator = Collator(ItemTable.load(root), tok, cfg.sequence, cfg.pretrain.masking, "pretrain", seed=0)
    keys = [k for batch in ShardLoader(root, "train", cfg.loader, collator) for k in batch["keys"]]
    return sorted(keys)


def test_loader_and_verify_stream_from_an_http_server(server, capsys):
    local, url = server
    expected = _keys(local)
    assert _keys(url) == expected and len(expected) == len(set(expected)) == 35  # every sequence exactly once
    assert ItemTable.load(url).item_ids == ItemTable.load(local).item_ids  # items.parquet: cached, sha256-checked
    assert main(["verify", url]) == 0
    assert '"ok": true' in capsys.readouterr().out


def test_a_connection_dropped_mid_shard_is_an_error_naming_it(server):
    local, url = server
    manifest = load_manifest(local)
    shard = manifest["shards"]["train"][0]["path"]
    _Handler.drop = {f"{local.name}/{shard}"}
    with pytest.raises(ValueError, match=rf"{shard}"):
        _keys(url, workers=0)
    assert main(["verify", url]) == 2  # the short body is named too


def test_shard_url_template_reads_through_a_pipe_command(uneven_dataset):
    local, _ = uneven_dataset
    assert _keys(local, workers=1, shard_url=f"'pipe:cat {local}/{{path}}'") == _keys(local, workers=1)
    with pytest.raises(ValueError, match=r"shard_url must contain \{path\}"):
        load_config(overrides=["--loader.shard_url=pipe:cat x"])


def test_pretraining_reads_its_data_from_the_url(server, tmp_path):
    from jepa4rec_dist.train.pretrain import pretrain

    _, url = server
    cfg = load_config([Path("configs/model/tiny.yaml")], [
        f"--data.out_dir={url}", f"--train.output_dir={tmp_path / 'pre'}", "--train.max_steps=2",
        "--loader.batch_size=4", "--loader.num_workers=1"])
    result = pretrain(cfg, progress=False)
    assert result["step"] == 2 and Path(result["export"], "model.safetensors").is_file()
