-- alertbridge alert history (MySQL 5.7+, MySQL 8, MariaDB 10.x). Load with: mysql alertbridge < schema.sql
-- The daemon creates the same tables itself on start (alertbridge.MYSQL_SCHEMA; a test keeps them equal).

CREATE TABLE IF NOT EXISTS alerts (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  receiver VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  fingerprint VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  starts_at DATETIME(3) NOT NULL,
  ends_at DATETIME(3) NULL,
  status VARCHAR(16) NOT NULL,
  alertname VARCHAR(255) NOT NULL DEFAULT '',
  instance VARCHAR(255) NOT NULL DEFAULT '',
  severity VARCHAR(64) NOT NULL DEFAULT '',
  job VARCHAR(255) NOT NULL DEFAULT '',
  summary TEXT NULL,
  description TEXT NULL,
  labels JSON NOT NULL,
  annotations JSON NOT NULL,
  generator_url TEXT NULL,
  first_received_at DATETIME(3) NOT NULL,
  last_received_at DATETIME(3) NOT NULL,
  received_count INT UNSIGNED NOT NULL DEFAULT 1,
  notified_count INT UNSIGNED NOT NULL DEFAULT 0,
  robots VARCHAR(1024) NOT NULL DEFAULT '',
  PRIMARY KEY (id),
  UNIQUE KEY uq_alerts_occurrence (receiver, fingerprint, starts_at),
  KEY ix_alerts_starts_at (starts_at),
  KEY ix_alerts_status (status, starts_at),
  KEY ix_alerts_alertname (alertname, starts_at),
  KEY ix_alerts_severity (severity)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS notifications (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  sent_at DATETIME(3) NOT NULL,
  receiver VARCHAR(128) NOT NULL,
  robot VARCHAR(128) NOT NULL,
  request_id VARCHAR(255) NOT NULL DEFAULT '',
  message_id BIGINT NOT NULL,
  alerts INT UNSIGNED NOT NULL,
  fingerprints TEXT NULL,
  errcode INT NULL,
  errmsg VARCHAR(512) NOT NULL DEFAULT '',
  latency_ms INT UNSIGNED NOT NULL,
  PRIMARY KEY (id),
  KEY ix_notifications_sent_at (sent_at),
  KEY ix_notifications_receiver (receiver, robot, sent_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS recorder_progress (
  journal_id VARCHAR(64) NOT NULL,
  last_event_id BIGINT NOT NULL,
  PRIMARY KEY (journal_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS incidents (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  route VARCHAR(128) NOT NULL,
  receiver VARCHAR(128) NOT NULL,
  group_hash CHAR(64) NOT NULL,
  open_group CHAR(64) NULL,
  group_key TEXT NOT NULL,
  group_labels JSON NOT NULL,
  title VARCHAR(512) NOT NULL DEFAULT '',
  level VARCHAR(64) NOT NULL DEFAULT '',
  level_rank INT NULL,
  state VARCHAR(16) NOT NULL,
  opened_at DATETIME(3) NOT NULL,
  acknowledged_at DATETIME(3) NULL,
  acknowledged_by VARCHAR(128) NULL,
  resolved_at DATETIME(3) NULL,
  escalations INT UNSIGNED NOT NULL DEFAULT 0,
  next_step_at DATETIME(3) NOT NULL,
  silence_id VARCHAR(64) NULL,
  silenced_until DATETIME(3) NULL,
  steps_from DATETIME(3) NULL,
  alerts_started_at DATETIME(3) NULL,
  alerts_ended_at DATETIME(3) NULL,
  source VARCHAR(16) NOT NULL DEFAULT 'alertmanager',
  PRIMARY KEY (id),
  UNIQUE KEY uq_incidents_open (route, open_group),
  KEY ix_incidents_next_step (state, next_step_at),
  KEY ix_incidents_group (route, group_hash, resolved_at),
  KEY ix_incidents_state (state, opened_at),
  KEY ix_incidents_opened_at (opened_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS incident_events (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  incident_id BIGINT UNSIGNED NOT NULL,
  at DATETIME(3) NOT NULL,
  kind VARCHAR(32) NOT NULL,
  actor VARCHAR(128) NOT NULL DEFAULT '',
  via VARCHAR(32) NOT NULL DEFAULT '',
  detail VARCHAR(1024) NOT NULL DEFAULT '',
  PRIMARY KEY (id),
  KEY ix_incident_events_incident (incident_id, at),
  KEY ix_incident_events_at (at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS incident_notes (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  note_key CHAR(64) CHARACTER SET ascii NOT NULL,
  incident_id BIGINT UNSIGNED NOT NULL,
  route VARCHAR(128) NOT NULL,
  kind VARCHAR(16) NOT NULL,
  level VARCHAR(64) NOT NULL DEFAULT '',
  text TEXT NOT NULL,
  mentions TEXT NOT NULL,
  created_at DATETIME(3) NOT NULL,
  relayed_by VARCHAR(64) NULL,
  sent_at DATETIME(3) NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uq_incident_notes_key (note_key),
  KEY ix_incident_notes_unsent (sent_at, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
