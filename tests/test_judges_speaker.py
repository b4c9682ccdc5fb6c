"""Speaker judges: resemblyzer tells one voice from two; a tiny random speechbrain ECAPA model saved as
a local speechbrain folder loads through the same config path as a real one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2train.judges.speaker import SpeakerConfig, SpeakerJudge, windows_of

A = "The morning train was late again, so we walked to the office."
B = "The children played in the park until the sun went down."
C = "We planted three small trees behind the old school last spring."


@pytest.fixture(scope="module")
def resemblyzer_judge():
    return SpeakerJudge(SpeakerConfig())


def test_one_voice_passes_and_two_voices_are_rejected(resemblyzer_judge, flite_wav):
    one = np.concatenate([flite_wav("awb", A), flite_wav("awb", B), flite_wav("awb", C)])
    two = np.concatenate([flite_wav("awb", A), flite_wav("slt", B), flite_wav("slt", C)])
    same, mixed = resemblyzer_judge([one, two])
    assert same["windows"] >= 5 and mixed["windows"] >= 5
    assert same["min_similarity"] > mixed["min_similarity"] + 0.1
    assert resemblyzer_judge.verdict(same) is None
    assert resemblyzer_judge.verdict(mixed) == "multi_speaker"


def test_embeddings_are_unit_length_and_batched(resemblyzer_judge, flite_wav):
    windows = windows_of(flite_wav("rms", A), 1.6, 0.8)
    emb = resemblyzer_judge.embedder.embed(windows)
    assert emb.shape == (len(windows), 256)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_windows_cover_the_tail():
    wav = np.arange(16000 * 5, dtype=np.float32)
    windows = windows_of(wav, 1.6, 0.8)
    assert windows[-1][-1] == wav[-1] and all(len(w) == int(1.6 * 16000) for w in windows)
    assert len(windows_of(wav[:8000], 1.6, 0.8)) == 1


TINY_ECAPA_YAML = """\
n_mels: 24
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [16, 16, 16, 16, 48]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 8
    lin_neurons: 12
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


@pytest.fixture(scope="module")
def tiny_ecapa_folder(tmp_path_factory):
    """A random ECAPA-TDNN saved as a speechbrain folder, laid out like spkrec-ecapa-voxceleb (whose
    yaml names its hub id as pretrained_path, which the loader must not follow)."""
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ecapa")
    model = ECAPA_TDNN(
        input_size=24,
        channels=[16, 16, 16, 16, 48],
        kernel_sizes=[5, 3, 3, 3, 1],
        dilations=[1, 2, 3, 4, 1],
        attention_channels=8,
        lin_neurons=12,
    )
    torch.save(model.state_dict(), folder / "embedding_model.ckpt")
    (folder / "hyperparams.yaml").write_text(TINY_ECAPA_YAML)
    return folder, model


def test_speechbrain_backend_loads_a_local_folder(tiny_ecapa_folder, flite_wav):
    folder, reference = tiny_ecapa_folder
    judge = SpeakerJudge(SpeakerConfig(backend="speechbrain", checkpoint=str(folder)))
    loaded = judge.embedder.model.mods.embedding_model
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    windows = windows_of(flite_wav("slt", A), 1.6, 0.8)
    emb = judge.embedder.embed(windows)
    assert emb.shape == (len(windows), 12)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    [scores] = judge([flite_wav("slt", A)])
    assert -1.0 <= scores["min_similarity"] <= scores["mean_similarity"] <= 1.0


def test_speechbrain_backend_needs_a_folder(tmp_path):
    with pytest.raises(ValueError, match="local speechbrain folder"):
        SpeakerJudge(SpeakerConfig(backend="speechbrain", checkpoint=str(tmp_path)))
