//! Errors raised to SQL callers: one enum, each case with its SQLSTATE, a
//! lower-case message and, where it helps, a hint written as a sentence.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{what} must not be null")]
    Null { what: &'static str },
    #[error("invalid destination \"{0}\"")]
    Destination(String),
    #[error("destination must not be empty")]
    EmptyDestination,
    #[error("headers must be a JSON object, not {0}")]
    HeadersNotObject(&'static str),
    #[error("header \"{name}\" must be a JSON string, not {kind}")]
    HeaderValue { name: String, kind: &'static str },
    #[error("invalid header name \"{0}\"")]
    HeaderName(String),
    #[error("header \"{0}\" is reserved by STOMP")]
    ReservedHeader(String),
    #[error("message body is {size} bytes, more than outbox.max_message_bytes ({limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("invalid version \"{0}\"")]
    Version(String),
    #[error("delay must not be negative")]
    NegativeDelay,
    #[error("{trigger}: {problem}")]
    Trigger {
        trigger: String,
        problem: TriggerProblem,
    },
    #[error("could not send to the broker: {0}")]
    Broker(String),
    #[error("the broker refused the message: {0}")]
    Refused(String),
    #[error("outbox.capture = 'wal' requires wal_level = logical")]
    WalLevel,
    #[error("outbox.capture = 'wal': the outbox slot of this database does not exist yet")]
    NoSlot,
}

/// What is wrong with an outbox trigger's definition or use.
#[derive(Debug, thiserror::Error)]
pub enum TriggerProblem {
    #[error("no destination given")]
    NoDestination,
    #[error("{0}")]
    Input(Box<OutboxError>),
    #[error("unknown option \"{0}\"")]
    UnknownOption(String),
    #[error("option \"{0}\" is not of the form key=value")]
    MalformedOption(String),
    #[error("option \"{0}\" given twice")]
    DuplicateOption(String),
    #[error("option \"{0}\" has no value")]
    EmptyOption(String),
    #[error("headers option is not valid JSON: {0}")]
    HeadersJson(String),
    #[error("unknown field \"{0}\"")]
    UnknownField(String),
    #[error("serializer {0} does not exist")]
    NoSerializer(String),
    #[error("serializer {name} must return jsonb, not {returns}")]
    SerializerReturns { name: String, returns: String },
    #[error("permission denied for serializer {0}")]
    SerializerPermission(String),
    #[error("serializer {0} returned null")]
    SerializerNull(String),
    #[error("outbox.publish() must be fired FOR EACH ROW")]
    StatementLevel,
    #[error("outbox.publish() must be fired AFTER the row change")]
    NotAfter,
    #[error("called outside a trigger without arguments")]
    NotTrigger,
}

impl OutboxError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            OutboxError::Null { .. } => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            OutboxError::TooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            OutboxError::Broker(_) => ERRCODE_CONNECTION_FAILURE,
            OutboxError::Refused(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            OutboxError::WalLevel | OutboxError::NoSlot => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            OutboxError::Trigger { problem, .. } => match problem {
                TriggerProblem::Input(inner) => inner.sqlstate(),
                TriggerProblem::HeadersJson(_) => ERRCODE_INVALID_TEXT_REPRESENTATION,
                TriggerProblem::SerializerPermission(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
                TriggerProblem::SerializerNull(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
                _ => ERRCODE_INVALID_PARAMETER_VALUE,
            },
            _ => ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            OutboxError::Null { what: "body" } => {
                "Pass a jsonb value; a JSON null is written as 'null'::jsonb."
            }
            OutboxError::Null { .. } => "Pass a value.",
            OutboxError::Destination(_) | OutboxError::EmptyDestination => {
                "A STOMP destination starts with \"/\", for example \"/topic/orders\" or \"/queue/billing\"."
            }
            OutboxError::HeadersNotObject(_) | OutboxError::HeaderValue { .. } => {
                "Pass headers as a JSON object of strings, for example '{\"team\": \"billing\"}'."
            }
            OutboxError::HeaderName(_) => {
                "Header names must be non-empty and must not contain \":\"."
            }
            OutboxError::ReservedHeader(_) => {
                "The worker sets destination, content-length, receipt, transaction, message-id, subscription, ack and id itself."
            }
            OutboxError::TooLarge { .. } => {
                "Send a smaller body, or raise outbox.max_message_bytes."
            }
            OutboxError::Version(_) => "A version is a non-empty text such as 'v1'.",
            OutboxError::NegativeDelay => "Pass a delay of zero or more, such as '30 seconds'.",
            OutboxError::Trigger { problem, .. } => return problem.hint(),
            OutboxError::Broker(_) => {
                "Check that the broker is running and that outbox.stomp_* point at it."
            }
            OutboxError::Refused(_) => "Check that the broker can route the destination.",
            OutboxError::WalLevel => {
                "Set wal_level = logical and restart PostgreSQL, or use outbox.capture = 'table'."
            }
            OutboxError::NoSlot => {
                "The publisher creates it when it starts with wal_level = logical and outbox_pg in shared_preload_libraries; this database must be in outbox.database. Use outbox.capture = 'table' meanwhile."
            }
        };
        Some(hint.to_string())
    }

    /// Raises this error as a Postgres ERROR; never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "outbox");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) returned")
    }
}

impl TriggerProblem {
    fn hint(&self) -> Option<String> {
        let hint = match self {
            TriggerProblem::NoDestination => {
                "Pass the destination as the first argument: EXECUTE FUNCTION outbox.publish('/topic/orders')."
            }
            TriggerProblem::Input(inner) => return inner.hint(),
            TriggerProblem::UnknownOption(_)
            | TriggerProblem::MalformedOption(_)
            | TriggerProblem::DuplicateOption(_)
            | TriggerProblem::EmptyOption(_) => {
                "Options after the destination are fields=a,b, version=v1, serializer=schema.function and headers={...}."
            }
            TriggerProblem::HeadersJson(_) => {
                "Write the headers option as headers={\"name\":\"value\"}."
            }
            TriggerProblem::UnknownField(_) => "List only columns of the table in fields=.",
            TriggerProblem::NoSerializer(_) | TriggerProblem::SerializerReturns { .. } => {
                "A serializer takes the table's row type and returns jsonb."
            }
            TriggerProblem::SerializerPermission(_) => {
                "Grant EXECUTE on the serializer to the role that changes the table."
            }
            TriggerProblem::SerializerNull(_) => {
                "Make the serializer return a JSON value for every row."
            }
            TriggerProblem::StatementLevel | TriggerProblem::NotAfter => {
                "Create it with CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/x')."
            }
            TriggerProblem::NotTrigger => {
                "Call outbox.publish(destination, body) or use it in CREATE TRIGGER."
            }
        };
        Some(hint.to_string())
    }
}

pub type Result<T> = std::result::Result<T, OutboxError>;
