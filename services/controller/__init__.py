"""The fleet controller: one leader tunes drafting for every replica through Redis."""
