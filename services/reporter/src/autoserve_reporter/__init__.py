"""AutoServe Health reporter: every event in ClickHouse, the seed's health reports, a report API."""
