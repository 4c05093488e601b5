from smolvlm.generation.scheduler import PAD_SLACK, Scheduler


def test_padding_runs_keep_each_runs_padding_within_the_slack():
    """Consecutive rows share a prefill pass while padding them to the run's longest adds at most the slack."""
    assert Scheduler.padding_runs([900, 90, 880, 20, 30], slack=128) == [range(0, 1), range(1, 2), range(2, 3),
                                                                        range(3, 5)]
    assert Scheduler.padding_runs([100, 110, 120, 90]) == [range(0, 4)]  # 70 padding tokens <= PAD_SLACK
    assert Scheduler.padding_runs([10, 10 + PAD_SLACK + 1]) == [range(0, 1), range(1, 2)]
    assert Scheduler.padding_runs([7]) == [range(0, 1)]
    assert Scheduler.padding_runs([]) == []
