"""The relational system of record: places, patients, admissions, devices, users, audit, dead letters."""
