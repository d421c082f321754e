"""The annotation half of the gateway: NLP annotations of reports, the concept dictionary, mappings, cohort queries."""
