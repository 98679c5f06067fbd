"""What a run writes and shows: the final report and model, card, plots, Pareto front,
export and publish of candidates, live tracking and the printed summary."""
