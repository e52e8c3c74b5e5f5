"""Password exchanges, both ways, sans-IO: clients authenticating to halephant (`server_side`) and
halephant authenticating to PostgreSQL (`upstream`). scramp does the SCRAM arithmetic."""
