//! The trigger function `outbox.publish()`: `CREATE TRIGGER ... AFTER ...
//! FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/x' [, 'key=value'])`.
//!
//! Vocabulary: a trigger's *spec* is its parsed arguments (destination and
//! options), cached per trigger OID for the life of the backend; its *shape*
//! says how a row becomes the body (the whole row, a *projection* onto the
//! `fields=` columns, or a *serializer* function) and is resolved against the
//! table's current columns, re-resolved when they change (and a serializer
//! for each role, by its search_path). A serializer must be a plain function
//! of the table's row type returning jsonb, which the role may EXECUTE
//! (checked at every row). Rows become jsonb through direct calls (to
//! `to_jsonb` or the serializer; no SPI), and the row is written by the
//! enqueue module.
//!
//! Re-entrant: a serializer, or the insert itself, may fire outbox triggers
//! again (this one too); each firing holds its own handles on the cache,
//! which is borrowed only to look up or replace an entry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_guard;
use pgrx::pg_sys;

use crate::enqueue::{self, Body, Message};
use crate::error::{OutboxError, TriggerProblem};
use crate::fmgr::finfo_v1;
use crate::headers::{self, Headers};
use crate::rowjson;

finfo_v1!(pg_finfo_outbox_publish_trigger);

/// `outbox.publish() RETURNS trigger`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_publish_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let context = unsafe { (*fcinfo).context };
    if context.is_null() || unsafe { (*context).type_ } != pg_sys::NodeTag::T_TriggerData {
        OutboxError::Trigger {
            trigger: "outbox.publish()".into(),
            problem: TriggerProblem::NotTrigger,
        }
        .raise();
    }
    let td = context.cast::<pg_sys::TriggerData>();
    if let Err(problem) = unsafe { fire(td) } {
        let label = unsafe { label(td) };
        OutboxError::Trigger {
            trigger: label,
            problem,
        }
        .raise();
    }
    pg_sys::Datum::from(0)
}

/// `trigger "name" on table "schema.table"`, for error messages.
unsafe fn label(td: *const pg_sys::TriggerData) -> String {
    unsafe {
        let name = CStr::from_ptr((*(*td).tg_trigger).tgname).to_string_lossy();
        format!(
            "trigger \"{name}\" on table \"{}\"",
            table_name((*td).tg_relation)
        )
    }
}

unsafe fn table_name(rel: pg_sys::Relation) -> String {
    let (nsp, name) = unsafe { schema_and_name(rel) };
    unsafe { qualified(nsp, &name) }
}

/// The table's schema and name, copied: a catalog look-up after may
/// rebuild the relation's entry.
unsafe fn schema_and_name(rel: pg_sys::Relation) -> (pg_sys::Oid, Vec<u8>) {
    unsafe {
        let form = &*(*rel).rd_rel;
        (
            form.relnamespace,
            CStr::from_ptr(form.relname.data.as_ptr())
                .to_bytes()
                .to_vec(),
        )
    }
}

/// `schema.table`.
unsafe fn qualified(nsp: pg_sys::Oid, name: &[u8]) -> String {
    let schema = unsafe { pg_sys::get_namespace_name(nsp) };
    let schema = if schema.is_null() {
        "?".into()
    } else {
        unsafe { CStr::from_ptr(schema) }.to_string_lossy()
    };
    format!("{schema}.{}", String::from_utf8_lossy(name))
}

unsafe fn fire(td: *const pg_sys::TriggerData) -> std::result::Result<(), TriggerProblem> {
    let event = unsafe { (*td).tg_event };
    if event & pg_sys::TRIGGER_EVENT_ROW == 0 {
        return Err(TriggerProblem::StatementLevel);
    }
    if event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER {
        return Err(TriggerProblem::NotAfter);
    }
    let (op, tuple) = unsafe {
        match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => ("INSERT", (*td).tg_trigtuple),
            pg_sys::TRIGGER_EVENT_UPDATE => ("UPDATE", (*td).tg_newtuple),
            pg_sys::TRIGGER_EVENT_DELETE => ("DELETE", (*td).tg_trigtuple),
            _ => return Err(TriggerProblem::StatementLevel),
        }
    };
    let trigger = unsafe { &*(*td).tg_trigger };
    let rel = unsafe { (*td).tg_relation };
    let desc = unsafe { (*rel).rd_att };

    // Shared handles, no borrow: the serializer and the insert may fire
    // this very trigger again (nested to any depth).
    let cached = Cached::get(trigger)?;
    let shape = unsafe { cached.shape(rel, desc) }?;
    let input = |e: OutboxError| TriggerProblem::Input(Box::new(e));
    // Into the WAL, the body's text is all that is kept: written straight
    // from the row where its columns allow.
    let direct = match crate::capture::wanted(false) {
        true => unsafe { cached.plan(&shape, desc) },
        false => None,
    };
    let text = direct.and_then(|plan| unsafe { plan.write(desc, tuple, enqueue::max_bytes()) });
    let body = match text {
        Some(text) => Body::Text(text),
        None => {
            let body = unsafe { shape.body(desc, tuple) }?;
            enqueue::check_size(body).map_err(input)?;
            Body::Jsonb(body)
        }
    };
    let table = unsafe { cached.table(rel) };
    let spec = &cached.spec;
    enqueue::write(&Message {
        destination: &spec.wire,
        version: spec.version.as_deref(),
        body,
        user_headers: &spec.headers,
        trigger: Some((op, &table)),
        delay: None,
    });
    Ok(())
}

unsafe fn trigger_args(t: &pg_sys::Trigger) -> Vec<String> {
    (0..t.tgnargs as usize)
        .map(|i| unsafe {
            CStr::from_ptr(*t.tgargs.add(i))
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Whether the trigger's arguments are still `args` (compared without
/// copying them).
unsafe fn same_args(args: &[String], t: &pg_sys::Trigger) -> bool {
    args.len() == t.tgnargs as usize
        && args
            .iter()
            .enumerate()
            .all(|(i, a)| unsafe { CStr::from_ptr(*t.tgargs.add(i)).to_bytes() == a.as_bytes() })
}

thread_local! {
    /// Bumped whenever a schema's catalog row changes (a rename, say).
    static SCHEMA_NAMES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static WATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn schema_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    SCHEMA_NAMES.set(SCHEMA_NAMES.get().wrapping_add(1));
}

/// The generation of schema names this backend has seen.
fn schema_names_generation() -> u64 {
    if !WATCHING.replace(true) {
        // SAFETY: once per backend (the callbacks live as long as it).
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(schema_changed),
                pg_sys::Datum::from(0),
            )
        };
    }
    SCHEMA_NAMES.get()
}

/// Triggers cached per backend before unused entries are dropped.
const MAX_CACHED: usize = 1000;

thread_local! {
    /// Per trigger OID. Each entry is shared (`Rc`) and borrowed only to
    /// look up or replace it, never across user code.
    static TRIGGERS: RefCell<HashMap<u32, Rc<Cached>>> = RefCell::new(HashMap::new());
    static TO_JSONB: std::cell::Cell<*mut pg_sys::FmgrInfo> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// A trigger's spec and its last resolved shape. A firing holds its own
/// `Rc` of both: a nested firing that re-resolves replaces the cache's,
/// and the old shape is freed when the last firing using it returns.
struct Cached {
    spec: Spec,
    shape: RefCell<Option<Rc<Shape>>>,
    /// How a row of the shape is written as text (`rowjson`), for the
    /// table as it was last seen.
    plan: RefCell<Option<(Rc<Shape>, Rc<rowjson::Plan>)>>,
    /// `schema.table` as last named.
    table: RefCell<Option<Named>>,
}

/// A table's `schema.table`: (schema oid, table name, schema names'
/// generation, the text).
type Named = (pg_sys::Oid, Vec<u8>, u64, Rc<str>);

impl Cached {
    fn get(t: &pg_sys::Trigger) -> std::result::Result<Rc<Cached>, TriggerProblem> {
        let oid = t.tgoid.to_u32();
        let hit = TRIGGERS.with(|c| {
            c.borrow()
                .get(&oid)
                .filter(|e| unsafe { same_args(&e.spec.args, t) })
                .cloned()
        });
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let fresh = Rc::new(Cached {
            spec: Spec::parse(unsafe { trigger_args(t) })?,
            shape: RefCell::new(None),
            plan: RefCell::new(None),
            table: RefCell::new(None),
        });
        TRIGGERS.with(|c| {
            let mut c = c.borrow_mut();
            // Dropped triggers (temporary tables, say) leave entries behind:
            // past a bound, keep only those a firing is using.
            if c.len() >= MAX_CACHED {
                c.retain(|_, e| Rc::strong_count(e) > 1);
            }
            c.insert(oid, fresh.clone())
        });
        Ok(fresh)
    }

    /// The shape for the table as it is now, resolved again when it no
    /// longer fits.
    unsafe fn shape(
        &self,
        rel: pg_sys::Relation,
        desc: pg_sys::TupleDesc,
    ) -> std::result::Result<Rc<Shape>, TriggerProblem> {
        let current = self.shape.borrow().clone();
        if let Some(shape) = current
            && unsafe { shape.fits(rel, desc) }
        {
            return Ok(shape);
        }
        let shape = Rc::new(unsafe { self.spec.resolve(rel, desc) }?);
        // The old shape (if no firing still holds it) is freed here.
        self.shape.replace(Some(shape.clone()));
        Ok(shape)
    }

    /// `schema.table` of the trigger's table, named again only when the
    /// table or a schema was renamed since (a catalog look-up and two
    /// strings per row were a tenth of a captured row's own cost).
    unsafe fn table(&self, rel: pg_sys::Relation) -> Rc<str> {
        let generation = schema_names_generation();
        {
            // SAFETY: read in place, before any catalog look-up.
            let form = unsafe { &*(*rel).rd_rel };
            let name = unsafe { CStr::from_ptr(form.relname.data.as_ptr()) }.to_bytes();
            if let Some((n, r, g, text)) = &*self.table.borrow()
                && *n == form.relnamespace
                && r == name
                && *g == generation
            {
                return text.clone();
            }
        }
        let (nsp, name) = unsafe { schema_and_name(rel) };
        let text: Rc<str> = unsafe { qualified(nsp, &name) }.into();
        self.table
            .replace(Some((nsp, name, generation, text.clone())));
        text
    }

    /// The plan that writes the shape's rows as text, when every column
    /// it takes allows (None: through `to_jsonb`, or the serializer).
    unsafe fn plan(&self, shape: &Rc<Shape>, desc: pg_sys::TupleDesc) -> Option<Rc<rowjson::Plan>> {
        if matches!(&**shape, Shape::Serializer(_)) {
            return None;
        }
        let current = self.plan.borrow().clone();
        let plan = match current {
            Some((of, plan)) if Rc::ptr_eq(&of, shape) && unsafe { plan.fits(desc) } => plan,
            _ => {
                // Made only here, not at every row.
                let attnums: Option<Vec<i16>> = match &**shape {
                    Shape::Projection(p) => Some(p.columns.iter().map(|c| c.0).collect()),
                    _ => None,
                };
                let plan = Rc::new(unsafe { rowjson::Plan::new(desc, attnums.as_deref()) });
                self.plan.replace(Some((shape.clone(), plan.clone())));
                plan
            }
        };
        plan.direct().then_some(plan)
    }
}

/// A trigger's parsed arguments.
struct Spec {
    args: Vec<String>,
    wire: String,
    version: Option<String>,
    headers: Headers,
    fields: Option<Vec<String>>,
    serializer: Option<String>,
}

enum Shape {
    Row,
    Projection(Projection),
    Serializer(Serializer),
}

/// A memory context of the backend's life, for what one shape keeps
/// between rows; deleted with the shape, so re-resolving does not grow
/// the backend.
struct Context(pg_sys::MemoryContext);

impl Context {
    unsafe fn new(name: &'static CStr) -> Context {
        Context(unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                name.as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            )
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Nothing else points into it: the row types blessed from it are
        // copied by the type cache, and its FmgrInfo is the shape's own.
        unsafe { pg_sys::MemoryContextDelete(self.0) };
    }
}

/// The `fields=` columns (plus `id`) as a record type of their own.
struct Projection {
    columns: Vec<(i16, String, pg_sys::Oid)>,
    desc: pg_sys::TupleDesc,
    _memory: Context,
}

struct Serializer {
    /// Row type it was resolved for, and the role whose search_path found it.
    rowtype: pg_sys::Oid,
    user: pg_sys::Oid,
    oid: pg_sys::Oid,
    /// Which version of its pg_proc row it was resolved from: fmgr caches
    /// what a SECURITY DEFINER function runs as (and its SET clauses), so
    /// an ALTER FUNCTION must resolve it again.
    version: Option<(u16, u16, u16, pg_sys::TransactionId)>,
    name: String,
    finfo: *mut pg_sys::FmgrInfo,
    _memory: Context,
}

/// The version of function `oid`'s pg_proc row (its place and inserting
/// transaction), None when it is gone.
unsafe fn proc_version(oid: pg_sys::Oid) -> Option<(u16, u16, u16, pg_sys::TransactionId)> {
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tuple.is_null() {
            return None;
        }
        let at = (*tuple).t_self;
        let version = (
            at.ip_blkid.bi_hi,
            at.ip_blkid.bi_lo,
            at.ip_posid,
            (*(*tuple).t_data).t_choice.t_heap.t_xmin,
        );
        pg_sys::ReleaseSysCache(tuple);
        Some(version)
    }
}

impl Spec {
    fn parse(args: Vec<String>) -> std::result::Result<Spec, TriggerProblem> {
        let input = |e: OutboxError| TriggerProblem::Input(Box::new(e));
        let Some(destination) = args.first() else {
            return Err(TriggerProblem::NoDestination);
        };
        let destination = enqueue::check_destination(Some(destination))
            .map_err(input)?
            .to_string();
        let (mut fields, mut version, mut serializer, mut headers) = (None, None, None, None);
        for opt in &args[1..] {
            let Some((key, value)) = opt.split_once('=') else {
                return Err(TriggerProblem::MalformedOption(opt.clone()));
            };
            let slot = match key.trim() {
                "fields" => &mut fields,
                "version" => &mut version,
                "serializer" => &mut serializer,
                "headers" => &mut headers,
                _ => return Err(TriggerProblem::UnknownOption(key.trim().to_string())),
            };
            if slot.replace(value.trim().to_string()).is_some() {
                return Err(TriggerProblem::DuplicateOption(key.trim().to_string()));
            }
        }
        let wire = enqueue::wire_destination(&destination, version.as_deref()).map_err(input)?;
        let headers = match headers {
            None => Vec::new(),
            Some(text) => {
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TriggerProblem::HeadersJson(e.to_string()))?;
                headers::from_json(&value).map_err(input)?
            }
        };
        let fields = fields.map(|f| {
            let mut names: Vec<String> = f
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            names.dedup();
            names
        });
        if matches!(&fields, Some(f) if f.is_empty()) {
            return Err(TriggerProblem::EmptyOption("fields".into()));
        }
        if matches!(&serializer, Some(s) if s.is_empty()) {
            return Err(TriggerProblem::EmptyOption("serializer".into()));
        }
        Ok(Spec {
            args,
            wire,
            version,
            headers,
            fields,
            serializer,
        })
    }

    unsafe fn resolve(
        &self,
        rel: pg_sys::Relation,
        desc: pg_sys::TupleDesc,
    ) -> std::result::Result<Shape, TriggerProblem> {
        unsafe {
            if let Some(name) = &self.serializer {
                return resolve_serializer(name, (*(*rel).rd_rel).reltype).map(Shape::Serializer);
            }
            let Some(fields) = &self.fields else {
                return Ok(Shape::Row);
            };
            let natts = (*desc).natts as i16;
            let find = |name: &str| {
                (1..=natts).find_map(|a| {
                    column(desc, a)
                        .filter(|(n, _)| n == name)
                        .map(|(n, t)| (a, n, t))
                })
            };
            let mut columns = Vec::new();
            if let Some(id) = find("id") {
                columns.push(id);
            }
            for f in fields {
                if columns.iter().any(|(_, n, _)| n == f) {
                    continue;
                }
                columns.push(find(f).ok_or_else(|| TriggerProblem::UnknownField(f.clone()))?);
            }
            // The projected record type outlives this call: build it in the
            // shape's own context and register it (BlessTupleDesc).
            let memory = Context::new(c"outbox trigger projection");
            let old = pg_sys::MemoryContextSwitchTo(memory.0);
            let pdesc = pg_sys::CreateTemplateTupleDesc(columns.len() as i32);
            for (i, (attnum, _, _)) in columns.iter().enumerate() {
                pg_sys::TupleDescCopyEntry(pdesc, (i + 1) as i16, desc, *attnum);
            }
            let pdesc = pg_sys::BlessTupleDesc(pdesc);
            pg_sys::MemoryContextSwitchTo(old);
            Ok(Shape::Projection(Projection {
                columns,
                desc: pdesc,
                _memory: memory,
            }))
        }
    }
}

impl Shape {
    /// Whether the shape still matches the table and the role.
    unsafe fn fits(&self, rel: pg_sys::Relation, desc: pg_sys::TupleDesc) -> bool {
        unsafe {
            match self {
                Shape::Row => true,
                Shape::Projection(p) => p.columns.iter().all(|(attnum, name, typ)| {
                    column(desc, *attnum).is_some_and(|(n, t)| &n == name && t == *typ)
                }),
                Shape::Serializer(s) => {
                    s.rowtype == (*(*rel).rd_rel).reltype
                        && s.user == pg_sys::GetUserId()
                        && proc_version(s.oid) == s.version
                }
            }
        }
    }

    /// The row as the message body (a jsonb datum).
    unsafe fn body(
        &self,
        desc: pg_sys::TupleDesc,
        tuple: pg_sys::HeapTuple,
    ) -> std::result::Result<pg_sys::Datum, TriggerProblem> {
        unsafe {
            match self {
                Shape::Row => Ok(to_jsonb(pg_sys::heap_copy_tuple_as_datum(tuple, desc))),
                Shape::Projection(p) => {
                    let n = (*desc).natts as usize;
                    let mut values = vec![pg_sys::Datum::from(0); n];
                    let mut nulls = vec![false; n];
                    pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
                    let mut pv: Vec<pg_sys::Datum> = Vec::with_capacity(p.columns.len());
                    let mut pn: Vec<bool> = Vec::with_capacity(p.columns.len());
                    for (attnum, _, _) in &p.columns {
                        pv.push(values[*attnum as usize - 1]);
                        pn.push(nulls[*attnum as usize - 1]);
                    }
                    let row = pg_sys::heap_form_tuple(p.desc, pv.as_mut_ptr(), pn.as_mut_ptr());
                    Ok(to_jsonb(pg_sys::heap_copy_tuple_as_datum(row, p.desc)))
                }
                Shape::Serializer(s) => {
                    // At every row, as the executor checks a function in a
                    // query: a REVOKE counts from the next message.
                    if !may_execute(s.oid) {
                        return Err(TriggerProblem::SerializerPermission(s.name.clone()));
                    }
                    let row = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
                    call_serializer(s, row)
                }
            }
        }
    }
}

/// Name and type of a live column, None for a dropped or missing one.
unsafe fn column(desc: pg_sys::TupleDesc, attnum: i16) -> Option<(String, pg_sys::Oid)> {
    unsafe {
        if attnum < 1 || attnum as i32 > (*desc).natts {
            return None;
        }
        let att = &*crate::direct::attribute(desc, (attnum - 1) as usize);
        if att.attisdropped {
            return None;
        }
        Some((
            CStr::from_ptr(att.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned(),
            att.atttypid,
        ))
    }
}

/// Whether the current role may execute function `oid` (a syscache
/// lookup; superusers always may).
unsafe fn may_execute(oid: pg_sys::Oid) -> bool {
    let user = unsafe { pg_sys::GetUserId() };
    let mode = pg_sys::ACL_EXECUTE as pg_sys::AclMode;
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    let result = unsafe { pg_sys::pg_proc_aclcheck(oid, user, mode) };
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    let result = unsafe { pg_sys::object_aclcheck(pg_sys::ProcedureRelationId, oid, user, mode) };
    result == pg_sys::AclResult::ACLCHECK_OK
}

/// Looks up `name(rowtype)` as the calling role sees it (search_path) and
/// checks its shape: a plain function of that one argument returning one
/// jsonb. EXECUTE is checked at each call (`Shape::body`).
unsafe fn resolve_serializer(
    name: &str,
    rowtype: pg_sys::Oid,
) -> std::result::Result<Serializer, TriggerProblem> {
    unsafe {
        let signature = format!("{name}({})", type_name(rowtype));
        let text =
            pg_sys::cstring_to_text_with_len(signature.as_ptr().cast(), signature.len() as i32);
        let oid = pgrx::direct_function_call_as_datum(
            pg_sys::to_regprocedure,
            &[Some(pg_sys::Datum::from(text))],
        )
        .map(|d| pg_sys::Oid::from(d.value() as u32))
        .filter(|oid| *oid != pg_sys::InvalidOid);
        let Some(oid) = oid else {
            return Err(TriggerProblem::NoSerializer(signature));
        };
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tuple.is_null() {
            return Err(TriggerProblem::NoSerializer(signature));
        }
        let form = &*pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_proc>();
        let (kind, retset, rettype) = (form.prokind as u8, form.proretset, form.prorettype);
        let one_arg = form.pronargs == 1 && *form.proargtypes.values.as_ptr() == rowtype;
        pg_sys::ReleaseSysCache(tuple);
        // (to_regprocedure found it by that one argument: a second look
        // costs nothing.)
        if !one_arg {
            return Err(TriggerProblem::NoSerializer(signature));
        }
        let returns = match kind {
            pg_sys::PROKIND_FUNCTION if rettype == pg_sys::JSONBOID && !retset => None,
            pg_sys::PROKIND_FUNCTION => Some(format!(
                "{}{}",
                if retset { "setof " } else { "" },
                type_name(rettype)
            )),
            pg_sys::PROKIND_PROCEDURE => Some("a procedure".into()),
            pg_sys::PROKIND_AGGREGATE => Some("an aggregate".into()),
            _ => Some("a window function".into()),
        };
        if let Some(returns) = returns {
            return Err(TriggerProblem::SerializerReturns {
                name: signature,
                returns,
            });
        }
        let memory = Context::new(c"outbox trigger serializer");
        let finfo = pg_sys::MemoryContextAllocZero(memory.0, size_of::<pg_sys::FmgrInfo>())
            .cast::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info_cxt(oid, finfo, memory.0);
        Ok(Serializer {
            rowtype,
            user: pg_sys::GetUserId(),
            oid,
            version: proc_version(oid),
            name: signature,
            finfo,
            _memory: memory,
        })
    }
}

unsafe fn type_name(typ: pg_sys::Oid) -> String {
    unsafe {
        let c = pg_sys::format_type_be(typ);
        let s = CStr::from_ptr(c).to_string_lossy().into_owned();
        pg_sys::pfree(c.cast());
        s
    }
}

unsafe fn call_serializer(
    s: &Serializer,
    row: pg_sys::Datum,
) -> std::result::Result<pg_sys::Datum, TriggerProblem> {
    unsafe {
        let size =
            size_of::<pg_sys::FunctionCallInfoBaseData>() + size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size).cast::<pg_sys::FunctionCallInfoBaseData>();
        (*fcinfo).flinfo = s.finfo;
        (*fcinfo).nargs = 1;
        (*fcinfo).fncollation = pg_sys::InvalidOid;
        let args = (*fcinfo).args.as_mut_slice(1);
        args[0] = pg_sys::NullableDatum {
            value: row,
            isnull: false,
        };
        let f = (*s.finfo).fn_addr.expect("fmgr_info sets fn_addr");
        let result = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| f(fcinfo));
        if (*fcinfo).isnull {
            return Err(TriggerProblem::SerializerNull(s.name.clone()));
        }
        Ok(result)
    }
}

/// `to_jsonb(record)` by direct call. `to_jsonb` reads its argument type
/// from the call expression, so the FmgrInfo carries one saying "record";
/// the datum's own header names the actual row type.
unsafe fn to_jsonb(row: pg_sys::Datum) -> pg_sys::Datum {
    unsafe {
        let mut finfo = TO_JSONB.with(|f| f.get());
        if finfo.is_null() {
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            finfo = pg_sys::palloc0(size_of::<pg_sys::FmgrInfo>()).cast();
            let oid = pg_sys::fmgr_internal_function(c"to_jsonb".as_ptr());
            pg_sys::fmgr_info(oid, finfo);
            let arg = pg_sys::makeNullConst(pg_sys::RECORDOID, -1, pg_sys::InvalidOid);
            let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
            let call = pg_sys::makeFuncExpr(
                oid,
                pg_sys::JSONBOID,
                args,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            );
            (*finfo).fn_expr = call.cast();
            pg_sys::MemoryContextSwitchTo(old);
            TO_JSONB.with(|f| f.set(finfo));
        }
        pg_sys::FunctionCall1Coll(finfo, pg_sys::InvalidOid, row)
    }
}
