"""Static leaderboard site (accuracy versus compression), built from results/."""
