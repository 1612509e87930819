"""The relational system of record: sites, units, beds, patients, admissions, devices, users, audit, dead letters."""
