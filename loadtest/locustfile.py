"""Locust scenarios for the ProductVision gateway.

    locust -f loadtest/locustfile.py --host HOST:PORT ColdUser            # or through `shelfsight loadtest`

Users (one per scenario): ColdUser (every picture new), HotUser (a small repeated set),
NearDuplicateUser (re-encoded/resized/cropped variants of a set), MixedUser (several questions,
unary and streaming). Requests are greedy (cacheable) with SHELFSIGHT_MAX_NEW_TOKENS new tokens.
Add loadtest/shapes.py to -f for a step-shaped load.
"""
from __future__ import annotations

import os
import random

import grpc
from locust import constant, task

from shelfsight import synth
from shelfsight.loadtest import images
from shelfsight.loadtest.grpc_user import GrpcUser
from shelfsight.protos import pb

MAX_NEW_TOKENS = int(os.environ.get("SHELFSIGHT_MAX_NEW_TOKENS", "32"))
QUESTION = synth.QUESTIONS[0]


def request(image: bytes, question: str = QUESTION):
    return pb.RecognizeRequest(image=image, question=question,
                               parameters=pb.GenerationParameters(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))


class _Shared:
    """Picture sets built once per Locust process, shared by its users."""

    _sets: dict = {}

    @classmethod
    def get(cls, name, factory):
        if name not in cls._sets:
            cls._sets[name] = factory()
        return cls._sets[name]


class ProductVisionUser(GrpcUser):
    abstract = True
    wait_time = constant(0)

    def ask(self, image: bytes, question: str = QUESTION) -> None:
        try:
            self.stub.Recognize(request(image, question))
        except grpc.RpcError:
            pass  # already reported to Locust by the interceptor

    def ask_stream(self, image: bytes, question: str = QUESTION) -> None:
        try:
            for _ in self.stub.RecognizeStream(request(image, question)):
                pass
        except grpc.RpcError:
            pass


class ColdUser(ProductVisionUser):
    def on_start(self):
        self.pictures = images.Cold()

    @task
    def recognize(self):
        self.ask(self.pictures())


class HotUser(ProductVisionUser):
    def on_start(self):
        self.pictures = _Shared.get("hot", lambda: images.Set(size=5, base_seed=1_000))

    @task
    def recognize(self):
        self.ask(self.pictures())


class NearDuplicateUser(ProductVisionUser):
    def on_start(self):
        self.pictures = _Shared.get("near", lambda: images.NearDuplicates(size=4, base_seed=5_000))

    @task
    def recognize(self):
        self.ask(self.pictures())


class MixedUser(ProductVisionUser):
    def on_start(self):
        self.pictures = _Shared.get("mixed", lambda: images.Set(size=20, base_seed=9_000))
        self.rng = random.Random()

    @task(3)
    def recognize(self):
        self.ask(self.pictures(), self.rng.choice(synth.QUESTIONS))

    @task(2)
    def recognize_stream(self):
        self.ask_stream(self.pictures(), self.rng.choice(synth.QUESTIONS))
