"""Tables, money and MSISDN helpers, and database access."""
