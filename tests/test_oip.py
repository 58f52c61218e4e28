"""Lists of texts and the Open Inference Protocol v2 at the real gateway, in front of the real
TorchServe: read by ``tritonclient[http]``, a client of that protocol written elsewhere, and
checked against the service's own one-text answers."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from project import LABELS
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXTS = ["i feel so delighted today", "i am terrified of the dark", "i feel lonely tonight", "i am furious at him"]
TOLERANCE = 1e-5  # each text runs in a forward pass of its own (int8) or shares one (fp32): same answer


@pytest.fixture(scope="module")
def singles(stack) -> list[dict]:
    """Each text's answer, one request per text."""
    answers = [
        requests.post(f"{stack.url}/predictions/emotion", json={"text": t}, headers=stack.headers(), timeout=30)
        for t in TEXTS
    ]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json() for a in answers]


def client(stack) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(stack.url.removeprefix("http://"), network_timeout=30)


def texts_input(texts: list, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() if isinstance(t, str) else t for t in texts], dtype=object), binary)
    return tensor


def strings(column) -> list[str]:
    """A BYTES output as text (tritonclient gives JSON data as str, binary data as bytes)."""
    return [x.decode() if isinstance(x, bytes) else x for x in column]


def assert_agrees(labels, probabilities, singles):
    assert strings(labels) == [s["label"] for s in singles]
    expected = np.array([[s["probabilities"][k] for k in LABELS] for s in singles])
    np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_reads_health_metadata_and_the_same_answers(stack, singles, binary):
    oip = client(stack)
    assert oip.is_server_live() and oip.is_server_ready()
    assert oip.is_model_ready("emotion", headers=stack.headers())
    metadata = oip.get_model_metadata("emotion", headers=stack.headers())
    assert [i["datatype"] for i in metadata["inputs"]] == ["BYTES"]
    assert metadata["parameters"]["labels"] == list(LABELS)
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "label")]
    result = oip.infer(
        "emotion", [texts_input(TEXTS, binary)], outputs=outputs, headers=stack.headers(), request_id="oip-1"
    )
    assert result.get_response()["id"] == "oip-1"
    assert result.as_numpy("probabilities").shape == (len(TEXTS), len(LABELS))
    assert_agrees(result.as_numpy("label"), result.as_numpy("probabilities"), singles)
    # No outputs named: all of them, each one column per text.
    everything = oip.infer("emotion", [texts_input(TEXTS, binary)], headers=stack.headers())
    assert_agrees(everything.as_numpy("label"), everything.as_numpy("probabilities"), singles)
    assert strings(everything.as_numpy("error")) == [""] * len(TEXTS)


def test_a_bad_text_gets_its_own_error_and_the_others_their_answers(stack, singles):
    texts = [TEXTS[0], " \u200b ", TEXTS[1], b"\xff\xfe", "x" * 5000, TEXTS[2]]
    result = client(stack).infer("emotion", [texts_input(texts, True)], headers=stack.headers())
    errors = strings(result.as_numpy("error"))
    assert [bool(e) for e in errors] == [False, True, False, True, True, False], errors
    good = [0, 2, 5]
    assert_agrees(
        result.as_numpy("label")[good], result.as_numpy("probabilities")[good], [singles[i] for i in (0, 1, 2)]
    )
    assert not result.as_numpy("probabilities")[[1, 3, 4]].any()

    listed = requests.post(
        f"{stack.url}/predictions/emotion",
        json={"texts": [TEXTS[0], 7, "", TEXTS[1]]},
        headers={**stack.headers(), "X-Request-ID": "list-1"},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["request_id"] == "list-1"
    answers = body["predictions"]
    assert [a.get("type") for a in answers] == [None, "InvalidType", "EmptyText", None]
    assert [a["request_id"] for a in answers] == [f"list-1.{i}" for i in range(4)]
    for answer, single in zip([answers[0], answers[3]], singles[:2], strict=True):
        assert answer["label"] == single["label"]
        assert answer["probabilities"] == pytest.approx(single["probabilities"], abs=TOLERANCE)


def test_the_texts_of_a_list_take_feedback_by_their_own_ids(stack):
    listed = requests.post(
        f"{stack.url}/predictions/emotion",
        json={"texts": TEXTS[:2]},
        headers={**stack.headers(), "X-Request-ID": "fb-list"},
        timeout=30,
    ).json()
    items = [{"request_id": a["request_id"], "label": a["label"]} for a in listed["predictions"]]

    def stored() -> list | None:
        answer = requests.post(f"{stack.url}/feedback", json=items, headers=stack.headers(), timeout=30)
        results = [r["result"] for r in answer.json()["results"]]
        return results if "unknown" not in results else None

    assert wait_for(stored, 20) == ["accepted", "accepted"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "one input"),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [65], "data": ["a"] * 65}]}, "1 to 64"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, "2 texts"),
        (
            {
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                "outputs": [{"name": "x"}],
            },
            "outputs",
        ),
        ([], "JSON object"),
    ],
)
def test_an_infer_body_out_of_shape_is_a_400_oip_clients_read(stack, body, fragment):
    answer = requests.post(f"{stack.url}/v2/models/emotion/infer", json=body, headers=stack.headers(), timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["type"] == "InvalidInferenceRequest" and fragment in answer.json()["error"]


def test_the_gateways_refusals_reach_an_oip_client_as_errors(stack):
    oip = client(stack)
    with pytest.raises(InferenceServerException, match="Authorization: Bearer") as refused:
        oip.infer("emotion", [texts_input(TEXTS[:1], False)])
    assert refused.value.status() == "401"
    with pytest.raises(InferenceServerException, match="Authorization: Bearer"):
        oip.get_model_metadata("emotion")
    with pytest.raises(InferenceServerException) as missing:
        oip.infer("emotion", [texts_input(TEXTS[:1], False)], model_version="9.9", headers=stack.headers())
    assert missing.value.status() == "404"
    # The OIP route goes through the gateway's request log like /predictions: one line, its id.
    oip.infer("emotion", [texts_input(TEXTS[:1], False)], headers={**stack.headers(), "X-Request-ID": "oip-log"})
    line = wait_for(lambda: [x for x in stack.gateway.log_lines() if "request_id=oip-log" in x], 10)
    assert line and '"POST /v2/models/emotion/infer HTTP/1.1" 200' in line[0]
    not_oip = requests.post(f"{stack.url}/v2/models/emotion/infer?x=1", data=b"{}", headers=stack.headers(), timeout=30)
    assert not_oip.status_code == 400 and json.loads(not_oip.text)["error"]


def test_the_client_and_bulk_scoring_through_the_gateway(stack, singles, tmp_path):
    import asyncio
    import csv

    from serving import bulk
    from serving.emotion_client import AsyncEmotionClient, EmotionClient, Prediction, PredictionError

    key = stack.headers()["Authorization"].removeprefix("Bearer ")
    with EmotionClient(stack.url, key=key) as client:
        one = client.predict(TEXTS[0], request_id="client-1")
        assert isinstance(one, Prediction) and one.request_id == "client-1" and one.label == singles[0]["label"]
        many = client.predict_many([*TEXTS, ""] * 20)  # 100 texts: two requests
        assert [type(a) for a in many[:5]] == [Prediction] * 4 + [PredictionError]
        assert [a.label for a in many[5:9]] == [s["label"] for s in singles]
        outcome = wait_for(lambda: client.feedback("client-1", one.label or "joy")["result"] == "accepted", 20)
        assert outcome

    async def concurrently() -> list:
        async with AsyncEmotionClient(stack.url, key=key) as client:
            return await client.predict_many(TEXTS * 40, concurrency=3)

    assert [a.label for a in asyncio.run(concurrently())] == [s["label"] for s in singles] * 40

    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "text", "other"])
        writer.writerows([[f"r{i}", TEXTS[i % len(TEXTS)], i] for i in range(150)] + [["bad", "", 0]])
    output = tmp_path / "out.jsonl"
    keys = stack.keys_file
    assert bulk.main([str(source), str(output), "--url", stack.url, "--key-file", str(keys), "--concurrency", "2"]) == 1
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [w["id"] for w in written] == [f"r{i}" for i in range(150)] + ["bad"]
    assert [w["label"] for w in written[:4]] == [s["label"] for s in singles]
    assert written[-1]["error"]["type"] == "EmptyText"


def explain(stack, body, headers=None, patient: bool = True):
    """POST /explanations/emotion; ``patient``: waits out the explanations' rate (429) first."""
    for _ in range(30):
        answer = requests.post(
            f"{stack.url}/explanations/emotion", json=body, headers={**stack.headers(), **(headers or {})}, timeout=60
        )
        if answer.status_code != 429 or not patient:
            return answer
        time.sleep(float(answer.headers.get("Retry-After", 1)))
    return answer


def test_an_explanation_is_the_fall_of_the_labels_probability_without_each_word(stack):
    text = "i feel so happy and calm with my friends today"
    answer = wait_for(lambda: (a := explain(stack, {"text": text})).status_code == 200 and a, 120)
    assert answer, "the explanation service never answered"
    body = answer.json()
    words = text.split()
    assert [w["word"] for w in body["words"]] == words and body["method"] == "occlusion"
    # Checked against the service's own predictions: the text, and the text without each word.
    variants = [text] + [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
    predicted = requests.post(
        f"{stack.url}/predictions/emotion", json={"texts": variants}, headers=stack.headers(), timeout=30
    ).json()["predictions"]
    label = body["label"]
    assert label == predicted[0]["label"] and body["score"] == pytest.approx(predicted[0]["probabilities"][label])
    for word, without in zip(body["words"], predicted[1:], strict=True):
        expected = predicted[0]["probabilities"][label] - without["probabilities"][label]
        assert word["attribution"] == pytest.approx(expected, abs=1e-5)
    # Another label asked for; the cost bounded on a long text.
    other = next(k for k in LABELS if k != label)
    assert explain(stack, {"text": text, "label": other}).json()["label"] == other
    long = explain(stack, {"text": " ".join(["happy"] * 100)}).json()
    assert (long["explained_words"], long["words_in_text"], len(long["words"])) == (48, 100, 48)
    assert explain(stack, {"text": text, "label": "bored"}).status_code == 400
    assert explain(stack, {"text": "  "}).json()["type"] == "EmptyText"


def test_explanations_need_a_key_and_have_a_rate_of_their_own(stack):
    refused = requests.post(f"{stack.url}/explanations/emotion", json={"text": "i am fine"}, timeout=30)
    assert refused.status_code == 401
    statuses = [explain(stack, {"text": "i am fine"}, patient=False).status_code for _ in range(12)]
    assert 429 in statuses and set(statuses) <= {200, 429}
    # The predictions' limits are not the explanations': a prediction right after is answered.
    after = requests.post(
        f"{stack.url}/predictions/emotion", json={"text": "i am fine"}, headers=stack.headers(), timeout=30
    )
    assert after.status_code == 200
