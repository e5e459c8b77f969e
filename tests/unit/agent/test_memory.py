from agent.memory import BurstTrimmer


def test_trims_after_a_burst_and_while_it_settles_never_on_small_changes() -> None:
    trimmer = BurstTrimmer(min_drop=100)
    assert [trimmer.observe(n) for n in (0, 50, 10, 80, 30)] == [False] * 5  # small ups and downs
    assert not trimmer.observe(1000)  # the burst
    assert not trimmer.observe(600)  # still more than half of the peak
    assert trimmer.observe(20)  # over: trim
    assert trimmer.observe(5)  # pooled connections closing after their streams: again
    assert not trimmer.observe(5)  # settled
    assert not trimmer.observe(2)  # a fall after settling is a small change again
    assert trimmer.trims == 2
