"""Ensemble plans on real SEAL (small parameters, explicitly insecure-for-tests): the decrypted
logits are the members' mean within the CKKS tolerance, with the weights in clear on the server
and encrypted under the clinic's public key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medhe.compiler import join_plans
from tests.helpers import (SMALL_N, ckks_tolerance, ckks_tolerance_encrypted_model, client_and_both_servers,
                           compile_torch, torch_out, two_block_model)

pytestmark = pytest.mark.he
SHAPE = (1, 16, 16)


def test_ensemble_on_seal_matches_the_members_mean_in_both_modes():
    torch.manual_seed(0)
    members = [two_block_model() for _ in range(2)]
    ensemble = join_plans([compile_torch(m, SHAPE, poly_modulus_degree=SMALL_N, insecure_for_tests=True)
                           for m in members])
    client, plain, encrypted = client_and_both_servers(ensemble, "seal")
    for _ in range(2):
        x = np.random.randn(*SHAPE)
        expected = np.mean([torch_out(m, x) for m in members], axis=0)
        magnitude = np.abs(expected).max()
        message = client.encrypt_input(x)
        got = client.decrypt_logits(plain.evaluate(message))
        np.testing.assert_allclose(got, expected, atol=ckks_tolerance(ensemble, magnitude))
        got_encrypted = client.decrypt_logits(encrypted.evaluate(message))
        np.testing.assert_allclose(got_encrypted, expected, atol=ckks_tolerance_encrypted_model(ensemble, magnitude))
        assert np.argmax(got) == np.argmax(got_encrypted) == np.argmax(expected)
