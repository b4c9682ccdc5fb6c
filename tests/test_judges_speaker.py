"""Speaker judges: resemblyzer tells one voice from two; a tiny random speechbrain ECAPA model saved as
a local speechbrain folder loads through the same config path as a real one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2train.judges.speaker import OVERLAP, SpeakerConfig, SpeakerJudge, windows_of

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


D = "Please close the window before you leave the house this morning."
E = "The farmer sold his apples at the market on the corner."


def test_turns_find_the_change_of_voice_and_the_overlap(resemblyzer_judge, flite_wav):
    def voice(speaker):
        return np.concatenate([flite_wav(speaker, t) for t in (A, B, C, D, E)])[: 10 * 16000]

    awb, slt = voice("awb"), voice("slt")
    [one] = resemblyzer_judge.turns(awb)
    assert (one.start, one.voice) == (0.0, 0) and one.end == pytest.approx(10.0)

    turns = resemblyzer_judge.turns(np.concatenate([awb, slt]))
    assert [t.voice for t in turns] == [0, 1]
    assert abs(turns[0].end - 10.0) < 0.6 and turns[1].start == turns[0].end

    back = resemblyzer_judge.turns(np.concatenate([awb, slt, awb[: 6 * 16000]]))
    assert [t.voice for t in back if t.voice != OVERLAP][:3] == [0, 1, 0]  # the first voice again

    both = np.zeros(25 * 16000, np.float32)  # awb 0-10 s, slt 5-25 s: both at once for 5 s
    both[: len(awb)] += awb
    both[5 * 16000 :] += np.concatenate([slt, slt])[: 20 * 16000]
    turns = resemblyzer_judge.turns(both)
    overlap = [t for t in turns if t.voice == OVERLAP]
    assert len(overlap) == 1 and overlap[0].values["mixture_margin"] > 0
    assert overlap[0].start <= 5.6 and overlap[0].end >= 9.4  # covers the overlap, give or take a hop
    assert overlap[0].end - overlap[0].start < 5.0 + 2 * 1.6
    assert [t.voice for t in turns] == [0, OVERLAP, 1]


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


def test_cuts_snap_to_a_nearby_pause_and_never_into_an_overlap():
    from data_pipeline.clean import _voice_parts
    from s2train.judges.speaker import Turn
    from s2train.judges.vad import Segment

    # speech 1-5 s, 5.5-9 s, 9.2-14 s: 4 + 3.5 + 4.8 s of speech
    seg = Segment(1.0, 14.0, [(1.0, 5.0), (5.5, 9.0), (9.2, 14.0)])
    # a change 4.2 s into the speech is 5.2 s into the recording: 0.05 s from the middle of the first pause
    (left, _), (right, _) = _voice_parts(seg, [Turn(0.0, 4.2, 0), Turn(4.2, 12.3, 1)])
    assert (left.start, left.end, right.start, right.end) == (1.0, 5.0, 5.5, 14.0)
    assert left.regions == [(1.0, 5.0)] and right.regions == [(5.5, 9.0), (9.2, 14.0)]

    # far from any pause (6.5 s into the recording): cut where the change is
    (left, _), (right, _) = _voice_parts(seg, [Turn(0.0, 5.5, 0), Turn(5.5, 12.3, 1)])
    assert left.end == right.start == pytest.approx(7.0)

    # an overlap from 3.7 to 7.4 s of speech (4.7 to 8.9 s): the voices either side move only away from it
    parts = _voice_parts(seg, [Turn(0.0, 3.7, 0), Turn(3.7, 7.4, OVERLAP), Turn(7.4, 12.3, 1)])
    (before, _), (overlap, _), (after, _) = parts
    assert before.end == overlap.start == pytest.approx(4.7)  # not to the pause at 5.0-5.5, inside it
    assert overlap.end == pytest.approx(8.9) and after.start == pytest.approx(9.2)  # the pause after it
