"""Learning and auto-tuning (DESIGN §7): arrives with a later issue; nothing is implemented yet."""
