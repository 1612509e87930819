"""Clinical rules, early-warning scores, the alarm lifecycle, escalation and delivery."""
