"""all-MiniLM-L6-v2 with its real weights on real sentences: the exported graph against the torch
module, the embeddings against what a sentence-embedding model must give, kiln against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from tests.models import minilm

pytestmark = pytest.mark.slow  # a real 90 MB model: about 10 s to export, once per run

# Pairs of the data file that say the same thing: each sentence's nearest neighbour among all of
# SENTENCES must be its partner. The first three are close paraphrases (cosine 0.76 to 0.94).
CLOSE_PARAPHRASES = [
    ("The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
     "On Wednesday the central bank increased its key interest rate by 0.25 percentage points."),
    ("How do I reset my password if I no longer have access to my email?",
     "What is the way to recover my account password without my old email address?"),
    ("Scientists have discovered a new species of frog in the rainforests of Ecuador.",
     "Researchers found a previously unknown frog species in the Ecuadorian rainforest."),
]
PARAPHRASES = CLOSE_PARAPHRASES + [
    ("A cat is sleeping on the windowsill in the afternoon sun.",
     "A kitten naps in the sunshine on a window ledge."),
    ("The football match ended in a goalless draw after extra time.",
     "Neither team managed to score, and the game finished nil-nil."),
    ("The stock market fell sharply after the announcement of new trade tariffs.",
     "Shares dropped steeply following news of fresh import duties."),
    ("A woman is slicing vegetables in the kitchen.",
     "Someone is chopping carrots and onions on a cutting board."),
    ("A man is playing an acoustic guitar on a small stage.",
     "A musician strums his guitar in front of a small audience."),
    ("Two dogs are chasing a ball across a grassy field.",
     "A pair of dogs run after a ball in the park."),
    ("The power outage lasted for nearly six hours and affected more than fifty thousand homes.",
     "Thousands of households were left without electricity for almost six hours."),
]
UNRELATED = [  # cosine between -0.05 and 0.04
    ("A cat is sleeping on the windowsill in the afternoon sun.",
     "The compiler reported an undefined reference to a function declared in the header file."),
    ("She plays the violin in the city's youth orchestra every Saturday morning.",
     "Matrix multiplication is the most expensive operation in a transformer layer."),
    ("The patient was advised to take the medication twice a day with food.",
     "Garbage collection pauses can cause latency spikes in long-running services."),
    ("How many calories should an adult eat each day to maintain a healthy weight?",
     "The startup raised twenty million dollars in its latest funding round to expand into Europe."),
]


@pytest.fixture(scope="module")
def module():
    if reason := minilm.unavailable():
        pytest.skip(reason)
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def session(minilm_onnx):
    return ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def all_embeddings(session):
    return session.run(["embeddings"], minilm.tokenize(minilm.SENTENCES))[0]


def cosine(embeddings: np.ndarray, first: str, second: str) -> float:
    a, b = (embeddings[minilm.SENTENCES.index(s)] for s in (first, second))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_sentences_are_real_and_fit_the_exported_length():
    if reason := minilm.unavailable():
        pytest.skip(reason)
    assert len(minilm.SENTENCES) >= 120
    assert len(set(minilm.SENTENCES)) == len(minilm.SENTENCES)
    assert max(minilm.token_counts(minilm.SENTENCES)) <= minilm.DEFAULT_LENGTH  # none truncated
    for pair in PARAPHRASES + UNRELATED:
        assert set(pair) <= set(minilm.SENTENCES), pair


def test_onnxruntime_matches_the_torch_module(module, session):
    inputs = minilm.tokenize(minilm.SENTENCES[:16])
    assert inputs["attention_mask"].min() == 0 and inputs["input_ids"].dtype == np.int64  # padding
    (actual,) = session.run(None, inputs)
    expected = minilm.embed(module, inputs)
    assert actual.shape == expected.shape == (16, 384)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def test_embeddings_have_unit_norm(all_embeddings):
    assert all_embeddings.shape == (len(minilm.SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(all_embeddings, axis=1), 1.0, rtol=0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(all_embeddings):
    for first, second in CLOSE_PARAPHRASES:
        assert cosine(all_embeddings, first, second) > 0.7, (first, second)
    for first, second in UNRELATED:
        assert cosine(all_embeddings, first, second) < 0.3, (first, second)
    similarity = all_embeddings @ all_embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(1)
    for first, second in PARAPHRASES:
        i, j = minilm.SENTENCES.index(first), minilm.SENTENCES.index(second)
        assert nearest[i] == j and nearest[j] == i, (first, second)
    off_diagonal = similarity[np.isfinite(similarity)]
    assert np.median(off_diagonal) < 0.1  # most pairs of the file are unrelated


def test_kiln_matches_onnxruntime(minilm_onnx, session):
    engine = kiln.build(minilm_onnx, device="cpu")
    assert [i.shape for i in engine.inputs] == [("batch", minilm.DEFAULT_LENGTH)] * 3
    for sentences in (minilm.SENTENCES[16:48], minilm.SENTENCES[-3:]):  # one engine, two batch sizes
        inputs = minilm.tokenize(sentences)
        (expected,) = session.run(None, inputs)
        actual = engine.run(inputs)
        assert list(actual) == ["embeddings"]
        assert actual["embeddings"].shape == expected.shape == (len(sentences), 384)
        assert actual["embeddings"].dtype == np.float32
        np.testing.assert_allclose(actual["embeddings"], expected, rtol=0, atol=1e-4)
