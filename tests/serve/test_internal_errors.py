"""An exception the server did not expect still reaches the client in OpenAI's error shape (a 500),
not as Starlette's plain-text page, and the server goes on answering."""

from __future__ import annotations

from starlette.testclient import TestClient

from conftest import toy_model_folder
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.serve.app import create_app
from lorakit.serve.config import ServeConfig
from lorakit.serve.inputs import Inputs
from lorakit.serve.registry import AdapterRegistry


def test_an_unexpected_exception_is_an_openai_shaped_500(monkeypatch, tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    model, tokenizer = load_causal_lm(folder).eval(), load_tokenizer(folder)
    app = create_app(model, tokenizer, AdapterRegistry(model, "toy"), ServeConfig(max_tokens=4))
    planted = {"on": True}
    real = Inputs.tokenize

    def tokenize(self, ask):
        if planted["on"]:
            raise ZeroDivisionError("planted")
        return real(self, ask)

    monkeypatch.setattr(Inputs, "tokenize", tokenize)
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.post("/v1/completions", json={"model": "toy", "prompt": "say red", "max_tokens": 2})
        assert reply.status_code == 500
        assert reply.json() == {"error": {"message": "internal server error (ZeroDivisionError)",
                                          "type": "server_error", "param": None, "code": None}}
        planted["on"] = False
        reply = client.post("/v1/completions", json={"model": "toy", "prompt": "say red", "max_tokens": 2,
                                                     "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
