"""Time-decoupled experts: the split covers the schedule exactly once, the release rule's lag, loading."""
import numpy as np
import pytest

from pangu_draw_ms.diffusion.denoiser import Conditioning
from pangu_draw_ms.diffusion.experts import STRUCTURE, TEXTURE, TimeDecoupledExperts
from pangu_draw_ms.diffusion.samplers import SAMPLERS, make_sampler
from pangu_draw_ms.diffusion.schedule import SPACINGS, NoiseSchedule

SCHEDULE = NoiseSchedule()
COND = Conditioning(np.zeros((1, 1, 1), np.float32), None)


class RecordingModel:
    """An eps model that records the timesteps it was asked for and returns a fixed prediction."""

    def __init__(self):
        self.seen = []

    def __call__(self, z, t, cond):
        self.seen.append(int(t))
        return 0.1 * z


def run(experts, sampler, timesteps):
    experts.plan(timesteps)
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    make_sampler(sampler, SCHEDULE).sample(lambda z, t: experts(z, t, COND), z, timesteps, rng=np.random.default_rng(1))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_exact_rule_partitions_the_schedule(sampler, spacing):
    for steps in (1, 2, 7, 20, 40, 50, 999):
        structure, texture = RecordingModel(), RecordingModel()
        experts = TimeDecoupledExperts(structure, texture, t_struct=500, rule="exact")
        timesteps = SCHEDULE.timesteps(steps, spacing)
        run(experts, sampler, timesteps)
        evaluated = {t for t, _ in experts.trace}
        assert evaluated == set(timesteps.tolist())
        assert set(structure.seen).isdisjoint(texture.seen)
        assert set(structure.seen) | set(texture.seen) == evaluated
        assert all(t >= 500 for t in structure.seen) and all(t < 500 for t in texture.seen)
        assert set(structure.seen) == {t for t in evaluated if t >= 500}


def test_release_rule_lags_one_step():
    structure, texture = RecordingModel(), RecordingModel()
    experts = TimeDecoupledExperts(structure, texture, t_struct=500, rule="release")
    timesteps = SCHEDULE.timesteps(40, "release")
    run(experts, "euler", timesteps)
    assert len(structure.seen) == 21 and len(texture.seen) == 19
    # The extra structure step is the first below T_struct (t = 499 at n = 40).
    assert min(structure.seen) == 499 and max(texture.seen) == 474
    exact = TimeDecoupledExperts(RecordingModel(), RecordingModel(), t_struct=500, rule="exact")
    run(exact, "euler", timesteps)
    assert [name for _, name in exact.trace].count(STRUCTURE) == 20


def test_release_rule_needs_a_plan():
    experts = TimeDecoupledExperts(RecordingModel(), RecordingModel(), rule="release")
    with pytest.raises(ValueError, match="plan"):
        experts(np.zeros((1, 4, 2, 2), np.float32), 999, COND)
    with pytest.raises(ValueError, match="switch rule"):
        TimeDecoupledExperts(RecordingModel(), RecordingModel(), rule="lagged")


def test_sequential_mode_loads_each_expert_once_and_releases_it():
    built, released = [], []

    def loader(name):
        def load():
            built.append(name)
            return RecordingModel()
        return load

    experts = TimeDecoupledExperts(loader(STRUCTURE), loader(TEXTURE), t_struct=500, sequential=True,
                                   on_release=released.append)
    run(experts, "heun", SCHEDULE.timesteps(30, "release"))
    assert built == [STRUCTURE, TEXTURE] and released == [STRUCTURE]
