"""Large-scale agentic data synthesis (paper §3.1.1, spec §4): tools, agents and tasks, simulated episodes, judging."""
