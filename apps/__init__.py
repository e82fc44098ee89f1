"""Demo endpoints: the applications gateways protect (PLC/HMI, sensors, video peers...)."""
