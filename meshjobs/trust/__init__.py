"""Trust: who may do what (policy), what peers have done (evidence, reputation) and who is shut out (quarantine)."""
