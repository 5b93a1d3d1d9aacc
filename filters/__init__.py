"""Pure stages that keep or drop records, each drop with a reason. No Ray, no Beam here."""
