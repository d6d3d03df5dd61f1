-- 0010_alert_severity_policy: every alert carries the severity of its kind by the policy in
-- docs/operations.md ("Severity"; backend.operations.alerts.SEVERITY): critical for what an operator must
-- act on now, warning for what needs watching, info (a parcel near the end of its pickup window, a door
-- an operator took out of service) for what never colours a box. Alerts raised before the policy are
-- brought in line, open or not, so the history reads the same.
UPDATE alerts SET severity = CASE
    WHEN kind = 'compartment_fault' AND details->>'fault' = 'out_of_service' THEN 'info'
    WHEN kind IN ('box_offline', 'door_left_open', 'compartment_fault', 'red_box_at_limit',
                  'temperature_out_of_range') THEN 'critical'
    WHEN kind = 'red_box_near_limit' THEN 'warning'
    WHEN kind = 'parcel_near_expiry' THEN 'info'
    ELSE severity
END;
