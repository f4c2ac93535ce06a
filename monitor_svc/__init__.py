"""The monitor service: job records, manager metadata, the child-event stream and step endings."""
